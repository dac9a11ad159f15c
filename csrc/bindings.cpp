// pybind11 module fastad._postprocess: numpy front end of the C++ post-processing library.
// fastad/postprocess.py validates arguments and shapes maps to (B, H, W) before calling in; the
// checks here only guard the memory contract. Compute runs with the GIL released so the runtime
// can post-process several images from several threads at once.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>
#include <vector>

#include "fastad/postprocess.hpp"

namespace py = pybind11;

namespace {

// C-contiguous float32 view; other dtypes/strides are converted (copied) by pybind11.
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using BoolArray = py::array_t<bool, py::array::c_style | py::array::forcecast>;

void require_ndim(const py::array& a, py::ssize_t ndim, const char* name) {
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) +
                                " dimensions, got " + std::to_string(a.ndim()));
}

int dim(const py::array& a, int axis) { return static_cast<int>(a.shape(axis)); }

FloatArray upsample_bilinear(const FloatArray& maps, int out_height, int out_width,
                             bool align_corners) {
  require_ndim(maps, 3, "maps");
  FloatArray out({static_cast<py::ssize_t>(maps.shape(0)), static_cast<py::ssize_t>(out_height),
                  static_cast<py::ssize_t>(out_width)});
  const float* src = maps.data();
  float* dst = out.mutable_data();
  const int batch = dim(maps, 0), in_h = dim(maps, 1), in_w = dim(maps, 2);
  py::gil_scoped_release release;
  fastad::upsample_bilinear(src, batch, in_h, in_w, dst, out_height, out_width, align_corners);
  return out;
}

FloatArray gaussian_blur(const FloatArray& maps, double sigma, double truncate) {
  require_ndim(maps, 3, "maps");
  FloatArray out({maps.shape(0), maps.shape(1), maps.shape(2)});
  const float* src = maps.data();
  float* dst = out.mutable_data();
  const int batch = dim(maps, 0), h = dim(maps, 1), w = dim(maps, 2);
  py::gil_scoped_release release;
  fastad::gaussian_blur(src, batch, h, w, dst, sigma, truncate);
  return out;
}

BoolArray threshold(const FloatArray& maps, float thr) {
  BoolArray out(std::vector<py::ssize_t>(maps.shape(), maps.shape() + maps.ndim()));
  const float* src = maps.data();
  auto* dst = reinterpret_cast<std::uint8_t*>(out.mutable_data());  // numpy bool: 1 byte, 0/1
  const std::size_t count = static_cast<std::size_t>(maps.size());
  py::gil_scoped_release release;
  fastad::threshold(src, count, thr, dst);
  return out;
}

// Regions as plain tuples (x0, y0, x1, y1, area, peak_score, peak_x, peak_y, mean_score);
// fastad.postprocess turns them into Region named tuples.
using RegionTuple = std::tuple<int, int, int, int, std::int64_t, float, int, int, double>;

std::vector<RegionTuple> regions(const BoolArray& mask, const FloatArray& amap,
                                 std::int64_t min_area, int connectivity) {
  require_ndim(mask, 2, "mask");
  require_ndim(amap, 2, "amap");
  if (mask.shape(0) != amap.shape(0) || mask.shape(1) != amap.shape(1))
    throw std::invalid_argument("mask and amap must have the same shape");
  const auto* mask_data = reinterpret_cast<const std::uint8_t*>(mask.data());
  const float* amap_data = amap.data();
  const int h = dim(amap, 0), w = dim(amap, 1);
  std::vector<fastad::Region> found;
  {
    py::gil_scoped_release release;
    found = fastad::find_regions(mask_data, amap_data, h, w, min_area, connectivity);
  }
  std::vector<RegionTuple> out;
  out.reserve(found.size());
  for (const fastad::Region& r : found)
    out.emplace_back(r.x0, r.y0, r.x1, r.y1, r.area, r.peak_score, r.peak_x, r.peak_y,
                     r.mean_score);
  return out;
}

}  // namespace

// Defaults equal those of the Python twins in fastad/postprocess.py.
PYBIND11_MODULE(_postprocess, m) {
  m.doc() = "C++ post-processing for fastad (see fastad.postprocess for the documented API)";
  m.def("upsample_bilinear", &upsample_bilinear, py::arg("maps"), py::arg("out_height"),
        py::arg("out_width"), py::arg("align_corners") = true,
        "(B, h, w) float32 -> (B, out_height, out_width), torch bilinear semantics");
  m.def("gaussian_blur", &gaussian_blur, py::arg("maps"), py::arg("sigma") = 4.0, py::arg("truncate") = 4.0,
        "(B, H, W) float32 -> (B, H, W), scipy gaussian_filter mode='reflect' per map");
  m.def("threshold", &threshold, py::arg("maps"), py::arg("thr"),
        "maps > thr (float32 comparison) as a bool array of the same shape");
  m.def("regions", &regions, py::arg("mask"), py::arg("amap"), py::arg("min_area") = 1,
        py::arg("connectivity") = 8,
        "connected components of a (H, W) mask as tuples (x0, y0, x1, y1, area, peak_score, "
        "peak_x, peak_y, mean_score), sorted by peak_score descending");
}
