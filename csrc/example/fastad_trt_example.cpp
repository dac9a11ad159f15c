// Engine -> post-processing in C++: runs a fastad TensorRT engine on a uniform grey batch and
// prints each image's score and regions. NOT COMPILED OR TESTED HERE (no TensorRT/GPU); built
// only with -DFASTAD_WITH_TENSORRT=ON.
//
//   fastad_trt_example MODEL.engine [BATCH] [THRESHOLD]
//
// Line software replaces the grey batch with camera frames preprocessed as fastad does in Python
// (resize/crop to the engine's input size, RGB float32 CHW, the same normalisation).
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

#include "fastad/postprocess.hpp"
#include "fastad/trt_runner.hpp"

int main(int argc, char** argv) {
  if (argc < 2 || argc > 4) {
    std::fprintf(stderr, "usage: %s MODEL.engine [BATCH] [THRESHOLD]\n", argv[0]);
    return 2;
  }
  try {
    fastad::TrtRunner runner(argv[1]);
    const int batch = argc > 2 ? std::atoi(argv[2]) : 1;
    const float thr = argc > 3 ? std::strtof(argv[3], nullptr) : 0.5f;
    const std::vector<std::int64_t> shape = runner.input_shape();  // (B, C, H, W), -1 = dynamic
    if (shape.size() != 4 || shape[1] < 1 || shape[2] < 1 || shape[3] < 1) {
      std::fprintf(stderr, "error: expected an input (B, C, H, W) with static C, H, W\n");
      return 2;
    }
    const int c = static_cast<int>(shape[1]), h = static_cast<int>(shape[2]),
              w = static_cast<int>(shape[3]);
    const std::vector<float> images(static_cast<std::size_t>(batch) * c * h * w, 0.5f);
    const fastad::EngineResult out = runner.run(images.data(), batch, c, h, w);

    const std::size_t plane = static_cast<std::size_t>(out.height) * out.width;
    std::vector<std::uint8_t> mask(plane);
    for (int b = 0; b < out.batch; ++b) {
      const float* amap = out.anomaly_map.data() + b * plane;
      fastad::threshold(amap, plane, thr, mask.data());
      const auto regions = fastad::find_regions(mask.data(), amap, out.height, out.width);
      std::printf("image %d: score %.6f, %zu region(s) above %g\n", b, out.score[b],
                  regions.size(), thr);
      for (const fastad::Region& r : regions)
        std::printf("  bbox (%d, %d, %d, %d)  area %lld  peak %.6f at (%d, %d)\n", r.x0, r.y0,
                    r.x1, r.y1, static_cast<long long>(r.area), r.peak_score, r.peak_x, r.peak_y);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
