// TensorRT engine runner for fastad engines, for line software in C++.
//
// NOT COMPILED OR TESTED IN THIS REPOSITORY'S CI: the development machines have no GPU and no
// TensorRT SDK. It is built only with `cmake -DFASTAD_WITH_TENSORRT=ON` when NvInfer.h, libnvinfer
// and the CUDA toolkit are found, and is written against the documented TensorRT 10 C++ API
// (name-based I/O: setInputShape / setTensorAddress / enqueueV3; also present in TensorRT 11).
//
// Engine contract (fastad's ONNX export): input `images` (B, 3, H, W) float32, outputs
// `anomaly_map` (B, S, S) float32 and `score` (B,) float32; the batch dimension may be dynamic.
// TensorRT and CUDA headers stay out of this header (pimpl), so callers need neither.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fastad {

struct EngineResult {
  int batch = 0, height = 0, width = 0;  // anomaly_map is (batch, height, width)
  std::vector<float> anomaly_map;        // row-major, batch * height * width values
  std::vector<float> score;              // one image score per batch item
};

class TrtRunner {
 public:
  // Deserializes the engine file and creates one execution context and one CUDA stream.
  // Throws std::runtime_error when the file, the engine or its I/O tensors do not fit the contract.
  explicit TrtRunner(const std::string& engine_path);
  ~TrtRunner();
  TrtRunner(const TrtRunner&) = delete;
  TrtRunner& operator=(const TrtRunner&) = delete;

  // Runs one batch: `images` is host memory holding (batch, channels, height, width) float32,
  // preprocessed as for the Python model. Blocks until the results are back on the host.
  // One runner serves one thread at a time (it owns one execution context).
  EngineResult run(const float* images, int batch, int channels, int height, int width);

  // The engine's input shape, -1 where a dimension is dynamic: (B, C, H, W).
  std::vector<std::int64_t> input_shape() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fastad
