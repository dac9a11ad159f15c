// fastad post-processing: the per-image steps after the network, as a plain C++17 library
// (no Python, no torch) for production-line software and for the pybind11 module
// fastad._postprocess.
//
//   upsample_bilinear  == torch.nn.functional.interpolate(mode="bilinear", align_corners=...)
//   gaussian_blur      == scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=...)
//   threshold          == map > thr (strictly greater, compared in float32)
//   find_regions       == connected components of a mask (4- or 8-connectivity) with box, area,
//                         peak and mean score, as fastad.postprocess.regions computes them.
//
// Layout contract: every map is float32, row-major and contiguous; a batch is `batch` maps of
// `height * width` values back to back, i.e. a C-contiguous (B, H, W) array. Invalid sizes or
// arguments throw std::invalid_argument with a one-line message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastad {

// (batch, in_height, in_width) -> (batch, out_height, out_width). Source coordinates follow
// PyTorch's area_pixel_compute_source_index: align_corners=true maps the corner pixels onto each
// other (scale (in-1)/(out-1)); align_corners=false is plain image resizing (scale in/out,
// src = (dst + 0.5) * scale - 0.5, clamped at 0).
void upsample_bilinear(const float* input, int batch, int in_height, int in_width, float* output,
                       int out_height, int out_width, bool align_corners);

// scipy's 1-D Gaussian weights: radius = int(truncate * sigma + 0.5), normalised to sum 1.
std::vector<double> gaussian_kernel1d(double sigma, double truncate);

// Separable Gaussian blur of each (height, width) map with scipy's 'reflect' boundary
// (d c b a | a b c d | d c b a, repeated when the radius exceeds the map). Like scipy it filters
// axis 0 then axis 1, accumulating in double and storing the intermediate map as float32.
// `input` and `output` may not overlap.
void gaussian_blur(const float* input, int batch, int height, int width, float* output,
                   double sigma = 4.0, double truncate = 4.0);

// mask[i] = input[i] > thr ? 1 : 0 for `count` values (NaN is never above the threshold).
void threshold(const float* input, std::size_t count, float thr, std::uint8_t* mask);

struct Region {
  int x0, y0, x1, y1;     // bounding box, inclusive-exclusive, in the map's pixel coordinates
  std::int64_t area;      // pixels in the component
  float peak_score;       // max map value in the component
  int peak_x, peak_y;     // where that max is; ties go to the first pixel in row-major order
  double mean_score;      // sum of the component's values (in double, row-major order) / area
};

// Connected components of `mask` (nonzero = foreground) on one (height, width) map, scored with
// `amap` (must be finite inside the mask). Components smaller than `min_area` are dropped.
// Sorted by peak_score descending, ties by peak position in row-major order.
std::vector<Region> find_regions(const std::uint8_t* mask, const float* amap, int height,
                                 int width, std::int64_t min_area = 1, int connectivity = 8);

}  // namespace fastad
