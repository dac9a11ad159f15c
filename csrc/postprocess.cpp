// Implementation of fastad/postprocess.hpp. Each function mirrors the arithmetic of the Python
// reference it is tested against (PyTorch's bilinear kernel, scipy's correlate1d), so the two
// paths agree to float32 rounding, not merely to a loose tolerance.
#include "fastad/postprocess.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace fastad {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

void require_map_size(int batch, int height, int width, const char* what) {
  require(batch >= 1 && height >= 1 && width >= 1,
          std::string(what) + " needs batch, height and width >= 1");
}

// ---------------------------------------------------------------------------------------------
// Bilinear upsampling
// ---------------------------------------------------------------------------------------------

// One output coordinate's two source taps and their weights along one axis.
struct LinearTap {
  int index0, index1;
  float weight0, weight1;
};

// PyTorch's area_pixel_compute_scale + area_pixel_compute_source_index + guard_index_and_lambda,
// in float like PyTorch's CPU kernel for float32 tensors.
std::vector<LinearTap> linear_taps(int in_size, int out_size, bool align_corners) {
  float scale;
  if (align_corners) {
    scale = out_size > 1 ? static_cast<float>(in_size - 1) / static_cast<float>(out_size - 1) : 0.f;
  } else {
    scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  }
  std::vector<LinearTap> taps(out_size);
  for (int dst = 0; dst < out_size; ++dst) {
    float src = align_corners ? scale * static_cast<float>(dst)
                              : scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;  // only reachable with align_corners=false (upsampling edges)
    const int i0 = std::min(static_cast<int>(std::floor(src)), in_size - 1);
    const float lambda = std::min(std::max(src - static_cast<float>(i0), 0.f), 1.f);
    taps[dst] = {i0, i0 < in_size - 1 ? i0 + 1 : i0, 1.f - lambda, lambda};
  }
  return taps;
}

// ---------------------------------------------------------------------------------------------
// Gaussian blur
// ---------------------------------------------------------------------------------------------

// Index of position i (may be outside [0, size)) under scipy's 'reflect' extension, which is
// periodic with period 2*size: a b c d | d c b a | a b c d ...
int reflect_index(int i, int size) {
  const int period = 2 * size;
  int m = i % period;
  if (m < 0) m += period;
  return m < size ? m : period - 1 - m;
}

// Filters every column of one map (scipy's axis 0). Row-wise accumulation keeps the inner loop
// contiguous; per pixel the sum is formed in scipy's order: w0*x[i] + sum_j (x[i-j]+x[i+j])*w[j].
// Hot loops index with std::ptrdiff_t: with 32-bit ints under -fwrapv (Python's default CFLAGS)
// the compiler cannot prove x - j does not wrap and stops vectorising (measured 1.5x slower).
void blur_axis0(const float* in, int height, int width, const std::vector<double>& kernel,
                float* out, std::vector<double>& acc) {
  const std::ptrdiff_t radius = static_cast<std::ptrdiff_t>(kernel.size() / 2), w_ = width;
  const double* w = kernel.data() + radius;  // w[j] for j in [-radius, radius]
  double* a = acc.data();
  for (int y = 0; y < height; ++y) {
    const float* center = in + y * w_;
    for (std::ptrdiff_t x = 0; x < w_; ++x) a[x] = static_cast<double>(center[x]) * w[0];
    for (std::ptrdiff_t j = 1; j <= radius; ++j) {
      const float* up = in + reflect_index(y - static_cast<int>(j), height) * w_;
      const float* down = in + reflect_index(y + static_cast<int>(j), height) * w_;
      for (std::ptrdiff_t x = 0; x < w_; ++x)
        a[x] += (static_cast<double>(up[x]) + static_cast<double>(down[x])) * w[j];
    }
    float* row = out + y * w_;
    for (std::ptrdiff_t x = 0; x < w_; ++x) row[x] = static_cast<float>(a[x]);
  }
}

// Filters every row of one map (scipy's axis 1) through a reflect-extended line buffer.
void blur_axis1(const float* in, int height, int width, const std::vector<double>& kernel,
                float* out, std::vector<double>& line, std::vector<double>& acc) {
  const std::ptrdiff_t radius = static_cast<std::ptrdiff_t>(kernel.size() / 2), w_ = width;
  const double* w = kernel.data() + radius;
  double* a = acc.data();
  for (int y = 0; y < height; ++y) {
    const float* row = in + y * w_;
    for (std::ptrdiff_t i = -radius; i < w_ + radius; ++i)
      line[i + radius] = static_cast<double>(row[reflect_index(static_cast<int>(i), width)]);
    const double* center = line.data() + radius;
    for (std::ptrdiff_t x = 0; x < w_; ++x) a[x] = center[x] * w[0];
    for (std::ptrdiff_t j = 1; j <= radius; ++j)
      for (std::ptrdiff_t x = 0; x < w_; ++x) a[x] += (center[x - j] + center[x + j]) * w[j];
    float* out_row = out + y * w_;
    for (std::ptrdiff_t x = 0; x < w_; ++x) out_row[x] = static_cast<float>(a[x]);
  }
}

// ---------------------------------------------------------------------------------------------
// Connected components
// ---------------------------------------------------------------------------------------------

// Labels the components of `mask` 1..n by flood fill from each unlabelled foreground pixel in
// row-major order (the numbering scipy.ndimage.label also produces). Returns n.
int label_components(const std::uint8_t* mask, int height, int width, int connectivity,
                     std::vector<std::int32_t>& labels) {
  static const int kOffsets[8][2] = {{-1, 0}, {1, 0}, {0, -1}, {0, 1},
                                     {-1, -1}, {-1, 1}, {1, -1}, {1, 1}};  // (dy, dx)
  const int n_offsets = connectivity == 8 ? 8 : 4;
  labels.assign(static_cast<std::size_t>(height) * width, 0);
  std::vector<std::int64_t> stack;
  int n = 0;
  for (std::int64_t start = 0; start < static_cast<std::int64_t>(labels.size()); ++start) {
    if (!mask[start] || labels[start]) continue;
    labels[start] = ++n;
    stack.push_back(start);
    while (!stack.empty()) {
      const std::int64_t p = stack.back();
      stack.pop_back();
      const int y = static_cast<int>(p / width), x = static_cast<int>(p % width);
      for (int k = 0; k < n_offsets; ++k) {
        const int ny = y + kOffsets[k][0], nx = x + kOffsets[k][1];
        if (ny < 0 || ny >= height || nx < 0 || nx >= width) continue;
        const std::int64_t q = static_cast<std::int64_t>(ny) * width + nx;
        if (mask[q] && !labels[q]) {
          labels[q] = n;
          stack.push_back(q);
        }
      }
    }
  }
  return n;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public functions
// ---------------------------------------------------------------------------------------------

void upsample_bilinear(const float* input, int batch, int in_height, int in_width, float* output,
                       int out_height, int out_width, bool align_corners) {
  require_map_size(batch, in_height, in_width, "upsample_bilinear input");
  require(out_height >= 1 && out_width >= 1, "upsample_bilinear output size must be >= 1");
  const std::vector<LinearTap> rows = linear_taps(in_height, out_height, align_corners);
  const std::vector<LinearTap> cols = linear_taps(in_width, out_width, align_corners);
  const std::size_t in_plane = static_cast<std::size_t>(in_height) * in_width;
  const std::size_t out_plane = static_cast<std::size_t>(out_height) * out_width;
  for (int b = 0; b < batch; ++b) {
    const float* src = input + b * in_plane;
    float* dst = output + b * out_plane;
    for (int oy = 0; oy < out_height; ++oy) {
      const LinearTap& r = rows[oy];
      const float* row0 = src + static_cast<std::size_t>(r.index0) * in_width;
      const float* row1 = src + static_cast<std::size_t>(r.index1) * in_width;
      float* out_row = dst + static_cast<std::size_t>(oy) * out_width;
      for (int ox = 0; ox < out_width; ++ox) {
        const LinearTap& c = cols[ox];
        out_row[ox] = r.weight0 * (c.weight0 * row0[c.index0] + c.weight1 * row0[c.index1]) +
                      r.weight1 * (c.weight0 * row1[c.index0] + c.weight1 * row1[c.index1]);
      }
    }
  }
}

std::vector<double> gaussian_kernel1d(double sigma, double truncate) {
  require(std::isfinite(sigma) && sigma > 0, "gaussian_blur sigma must be finite and > 0");
  require(std::isfinite(truncate) && truncate >= 0, "gaussian_blur truncate must be finite and >= 0");
  require(truncate * sigma < 1e7, "gaussian_blur sigma * truncate (the kernel radius) must be < 1e7");
  const int radius = static_cast<int>(truncate * sigma + 0.5);
  // scipy: exp(-0.5 / sigma**2 * x**2) / sum
  std::vector<double> kernel(2 * static_cast<std::size_t>(radius) + 1);
  const double inv = -0.5 / (sigma * sigma);
  double sum = 0;
  for (int x = -radius; x <= radius; ++x) {
    kernel[x + radius] = std::exp(inv * static_cast<double>(x * x));
    sum += kernel[x + radius];
  }
  for (double& k : kernel) k /= sum;
  return kernel;
}

void gaussian_blur(const float* input, int batch, int height, int width, float* output,
                   double sigma, double truncate) {
  require_map_size(batch, height, width, "gaussian_blur");
  const std::vector<double> kernel = gaussian_kernel1d(sigma, truncate);
  const int radius = static_cast<int>(kernel.size() / 2);
  const std::size_t plane = static_cast<std::size_t>(height) * width;
  std::vector<float> after_axis0(plane);  // float32, as scipy stores it between the passes
  std::vector<double> acc(width), line(width + 2 * static_cast<std::size_t>(radius));
  for (int b = 0; b < batch; ++b) {
    blur_axis0(input + b * plane, height, width, kernel, after_axis0.data(), acc);
    blur_axis1(after_axis0.data(), height, width, kernel, output + b * plane, line, acc);
  }
}

void threshold(const float* input, std::size_t count, float thr, std::uint8_t* mask) {
  for (std::size_t i = 0; i < count; ++i) mask[i] = input[i] > thr ? 1 : 0;
}

std::vector<Region> find_regions(const std::uint8_t* mask, const float* amap, int height,
                                 int width, std::int64_t min_area, int connectivity) {
  require_map_size(1, height, width, "find_regions");
  require(connectivity == 4 || connectivity == 8, "connectivity must be 4 or 8");
  std::vector<std::int32_t> labels;
  const int n = label_components(mask, height, width, connectivity, labels);

  // One row-major pass accumulates every component's statistics; the row-major order fixes both
  // the peak tie rule (first wins: strict >) and the order of the double sum behind mean_score.
  std::vector<Region> stats(n);
  std::vector<double> sums(n, 0.0);
  for (Region& r : stats) {
    r = {width, height, 0, 0, 0, -std::numeric_limits<float>::infinity(), 0, 0, 0.0};
  }
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      const std::size_t p = static_cast<std::size_t>(y) * width + x;
      if (!labels[p]) continue;
      const float v = amap[p];
      require(std::isfinite(v), "find_regions needs finite map values inside the mask");
      Region& r = stats[labels[p] - 1];
      r.x0 = std::min(r.x0, x);
      r.y0 = std::min(r.y0, y);
      r.x1 = std::max(r.x1, x + 1);
      r.y1 = std::max(r.y1, y + 1);
      r.area += 1;
      sums[labels[p] - 1] += static_cast<double>(v);
      if (v > r.peak_score) {
        r.peak_score = v;
        r.peak_x = x;
        r.peak_y = y;
      }
    }
  }
  std::vector<Region> regions;
  for (int i = 0; i < n; ++i) {
    if (stats[i].area < min_area) continue;
    stats[i].mean_score = sums[i] / static_cast<double>(stats[i].area);
    regions.push_back(stats[i]);
  }
  std::sort(regions.begin(), regions.end(), [](const Region& a, const Region& b) {
    if (a.peak_score != b.peak_score) return a.peak_score > b.peak_score;
    if (a.peak_y != b.peak_y) return a.peak_y < b.peak_y;
    return a.peak_x < b.peak_x;
  });
  return regions;
}

}  // namespace fastad
