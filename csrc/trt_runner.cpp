// TensorRT runner (see fastad/trt_runner.hpp). NOT COMPILED OR TESTED HERE: no TensorRT SDK or
// GPU on the development machines; written against the TensorRT 10 C++ API documentation.
#include "fastad/trt_runner.hpp"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>

namespace fastad {
namespace {

constexpr char kInput[] = "images";
constexpr char kAnomalyMap[] = "anomaly_map";
constexpr char kScore[] = "score";

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
}

// TensorRT reports through a logger that must outlive the runtime and the engine.
class StderrLogger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* message) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", message);
  }
};

std::vector<char> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open engine file " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

std::int64_t volume(const nvinfer1::Dims& dims) {
  std::int64_t n = 1;
  for (int i = 0; i < dims.nbDims; ++i) n *= dims.d[i];
  return n;
}

// A device buffer that only grows, so steady-state batches allocate nothing.
struct DeviceBuffer {
  void* data = nullptr;
  std::size_t bytes = 0;
  void reserve(std::size_t needed) {
    if (needed <= bytes) return;
    void* old = data;
    data = nullptr;
    bytes = 0;
    if (old) check_cuda(cudaFree(old), "cudaFree");
    check_cuda(cudaMalloc(&data, needed), "cudaMalloc");
    bytes = needed;
  }
  ~DeviceBuffer() {
    if (data) cudaFree(data);
  }
};

}  // namespace

struct TrtRunner::Impl {
  // Members are destroyed in reverse order: buffers, context, engine, runtime, then the logger
  // that all TensorRT objects report to.
  StderrLogger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  cudaStream_t stream = nullptr;
  DeviceBuffer images, anomaly_map, score;

  ~Impl() {
    context.reset();  // before the stream and buffers it may reference
    if (stream) cudaStreamDestroy(stream);
  }

  void require_tensor(const char* name, nvinfer1::TensorIOMode mode) const {
    for (int i = 0; i < engine->getNbIOTensors(); ++i) {
      if (std::string(engine->getIOTensorName(i)) != name) continue;
      if (engine->getTensorIOMode(name) != mode)
        throw std::runtime_error(std::string("engine tensor '") + name + "' has the wrong direction");
      if (engine->getTensorDataType(name) != nvinfer1::DataType::kFLOAT)
        throw std::runtime_error(std::string("engine tensor '") + name + "' is not float32");
      return;
    }
    throw std::runtime_error(std::string("engine has no I/O tensor named '") + name + "'");
  }
};

TrtRunner::TrtRunner(const std::string& engine_path) : impl_(std::make_unique<Impl>()) {
  const std::vector<char> blob = read_file(engine_path);
  impl_->runtime.reset(nvinfer1::createInferRuntime(impl_->logger));
  if (!impl_->runtime) throw std::runtime_error("createInferRuntime failed");
  impl_->engine.reset(impl_->runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!impl_->engine)
    throw std::runtime_error("cannot deserialize " + engine_path +
                             " (built with another TensorRT version or for another GPU?)");
  impl_->require_tensor(kInput, nvinfer1::TensorIOMode::kINPUT);
  impl_->require_tensor(kAnomalyMap, nvinfer1::TensorIOMode::kOUTPUT);
  impl_->require_tensor(kScore, nvinfer1::TensorIOMode::kOUTPUT);
  impl_->context.reset(impl_->engine->createExecutionContext());
  if (!impl_->context) throw std::runtime_error("createExecutionContext failed");
  check_cuda(cudaStreamCreate(&impl_->stream), "cudaStreamCreate");
}

TrtRunner::~TrtRunner() = default;

std::vector<std::int64_t> TrtRunner::input_shape() const {
  const nvinfer1::Dims dims = impl_->engine->getTensorShape(kInput);
  return std::vector<std::int64_t>(dims.d, dims.d + dims.nbDims);
}

EngineResult TrtRunner::run(const float* images, int batch, int channels, int height, int width) {
  if (batch < 1 || channels < 1 || height < 1 || width < 1)
    throw std::invalid_argument("TrtRunner::run needs batch, channels, height, width >= 1");
  Impl& m = *impl_;
  // Dynamic batch: the shape must be set before output shapes can be queried or enqueueV3 runs;
  // setInputShape fails when the shape lies outside the engine's optimisation profile.
  if (!m.context->setInputShape(kInput, nvinfer1::Dims4{batch, channels, height, width}))
    throw std::runtime_error("input shape outside the engine's optimisation profile");
  const nvinfer1::Dims map_dims = m.context->getTensorShape(kAnomalyMap);
  const nvinfer1::Dims score_dims = m.context->getTensorShape(kScore);
  if (map_dims.nbDims != 3 || map_dims.d[0] != batch || volume(score_dims) != batch)
    throw std::runtime_error("engine outputs are not anomaly_map (B, S, S) and score (B)");

  const std::size_t in_count = static_cast<std::size_t>(batch) * channels * height * width;
  const std::size_t map_count = static_cast<std::size_t>(volume(map_dims));
  m.images.reserve(in_count * sizeof(float));
  m.anomaly_map.reserve(map_count * sizeof(float));
  m.score.reserve(static_cast<std::size_t>(batch) * sizeof(float));
  if (!m.context->setTensorAddress(kInput, m.images.data) ||
      !m.context->setTensorAddress(kAnomalyMap, m.anomaly_map.data) ||
      !m.context->setTensorAddress(kScore, m.score.data))
    throw std::runtime_error("setTensorAddress failed");

  EngineResult result;
  result.batch = batch;
  result.height = static_cast<int>(map_dims.d[1]);
  result.width = static_cast<int>(map_dims.d[2]);
  result.anomaly_map.resize(map_count);
  result.score.resize(batch);
  check_cuda(cudaMemcpyAsync(m.images.data, images, in_count * sizeof(float),
                             cudaMemcpyHostToDevice, m.stream), "cudaMemcpyAsync (images)");
  if (!m.context->enqueueV3(m.stream)) throw std::runtime_error("enqueueV3 failed");
  check_cuda(cudaMemcpyAsync(result.anomaly_map.data(), m.anomaly_map.data,
                             map_count * sizeof(float), cudaMemcpyDeviceToHost, m.stream),
             "cudaMemcpyAsync (anomaly_map)");
  check_cuda(cudaMemcpyAsync(result.score.data(), m.score.data, batch * sizeof(float),
                             cudaMemcpyDeviceToHost, m.stream), "cudaMemcpyAsync (score)");
  check_cuda(cudaStreamSynchronize(m.stream), "cudaStreamSynchronize");
  return result;
}

}  // namespace fastad
