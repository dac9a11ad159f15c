// Post-processing in line software, without Python: blur -> threshold -> regions on one map.
//
//   fastad_postprocess_example                          # synthetic 256x256 map with two defects
//   fastad_postprocess_example MAP.f32 HEIGHT WIDTH [THRESHOLD] [SIGMA] [MIN_AREA]
//
// MAP.f32 is a raw little-endian float32 (HEIGHT, WIDTH) row-major map, e.g. written from Python
// with `anomaly_map.astype("float32").tofile("map.f32")`. Prints one line per region.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastad/postprocess.hpp"

namespace {

// A low background with deterministic noise and two Gaussian "defects" of different strength.
std::vector<float> synthetic_map(int height, int width) {
  std::vector<float> map(static_cast<std::size_t>(height) * width);
  unsigned state = 12345u;
  auto noise = [&state] {  // small LCG: the example prints the same regions on every machine
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / static_cast<float>(1u << 24);
  };
  auto blob = [](float x, float y, float cx, float cy, float radius) {
    const float d2 = (x - cx) * (x - cx) + (y - cy) * (y - cy);
    return std::exp(-d2 / (2.f * radius * radius));
  };
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x)
      map[static_cast<std::size_t>(y) * width + x] =
          0.1f * noise() + 0.9f * blob(x, y, 0.3f * width, 0.4f * height, 0.04f * width) +
          0.6f * blob(x, y, 0.7f * width, 0.75f * height, 0.06f * width);
  return map;
}

std::vector<float> read_map(const std::string& path, int height, int width) {
  std::vector<float> map(static_cast<std::size_t>(height) * width);
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  file.read(reinterpret_cast<char*>(map.data()), static_cast<std::streamsize>(map.size() * 4));
  if (file.gcount() != static_cast<std::streamsize>(map.size() * 4) || file.peek() != EOF)
    throw std::runtime_error(path + " does not hold exactly " + std::to_string(height) + "x" +
                             std::to_string(width) + " float32 values");
  return map;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc != 1 && (argc < 4 || argc > 7)) {
      std::fprintf(stderr, "usage: %s [MAP.f32 HEIGHT WIDTH [THRESHOLD] [SIGMA] [MIN_AREA]]\n",
                   argv[0]);
      return 2;
    }
    const bool synthetic = argc == 1;
    const int height = synthetic ? 256 : std::atoi(argv[2]);
    const int width = synthetic ? 256 : std::atoi(argv[3]);
    if (height < 1 || width < 1) throw std::invalid_argument("HEIGHT and WIDTH must be >= 1");
    const float thr = argc > 4 ? std::strtof(argv[4], nullptr) : 0.3f;
    const double sigma = argc > 5 ? std::strtod(argv[5], nullptr) : 4.0;
    const long min_area = argc > 6 ? std::atol(argv[6]) : 1;

    const std::vector<float> map = synthetic ? synthetic_map(height, width)
                                             : read_map(argv[1], height, width);
    std::vector<float> blurred(map.size());
    fastad::gaussian_blur(map.data(), 1, height, width, blurred.data(), sigma);
    std::vector<std::uint8_t> mask(map.size());
    fastad::threshold(blurred.data(), blurred.size(), thr, mask.data());
    const std::vector<fastad::Region> regions =
        fastad::find_regions(mask.data(), blurred.data(), height, width, min_area);

    std::printf("map %dx%d (%s), sigma %g, threshold %g: %zu region(s)\n", height, width,
                synthetic ? "synthetic" : argv[1], sigma, thr, regions.size());
    for (const fastad::Region& r : regions)
      std::printf("  bbox (%d, %d, %d, %d)  area %lld  peak %.6f at (%d, %d)  mean %.6f\n", r.x0,
                  r.y0, r.x1, r.y1, static_cast<long long>(r.area), r.peak_score, r.peak_x,
                  r.peak_y, r.mean_score);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
