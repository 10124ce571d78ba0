/*
 * launch.cuh: host-side launch helpers shared by the CUDA entry points (nm_decode.cu,
 * sp24_decode.cu): the SM count of a device (asked once), a scope that makes a device current,
 * and run_on_device, which does both around a launch.
 */
#ifndef ATV_LAUNCH_CUH
#define ATV_LAUNCH_CUH

#include <atomic>

#include <cuda_runtime_api.h>

#include "atv_sparse_cuda.cuh"

namespace atv {

inline int sm_count(int device, cudaError_t* err) {
    static std::atomic<int> cache[64];  // per device; 0 = not asked yet
    if (device >= 0 && device < 64) {
        const int known = cache[device].load(std::memory_order_relaxed);
        if (known > 0) return known;
    }
    int count = 0;
    *err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (*err == cudaSuccess && count > 0 && device >= 0 && device < 64) cache[device].store(count);
    return count > 0 ? count : 1;
}

// Make `device` current for this library's runtime for one call, then restore the previous one
// (the caller's framework keeps its own notion of the current device).
class DeviceScope {
  public:
    explicit DeviceScope(int device) {
        err_ = cudaGetDevice(&previous_);
        if (err_ == cudaSuccess && previous_ != device) {
            err_ = cudaSetDevice(device);
            switched_ = err_ == cudaSuccess;
        }
    }
    ~DeviceScope() {
        if (switched_) cudaSetDevice(previous_);
    }
    cudaError_t error() const { return err_; }

  private:
    int previous_ = 0;
    bool switched_ = false;
    cudaError_t err_ = cudaSuccess;
};

// launch(sms) -> cudaError_t, run with `device` current; a device or attribute error is returned as is.
template <typename Launch>
int run_on_device(int device, Launch launch) {
    DeviceScope scope(device);
    if (scope.error() != cudaSuccess) return scope.error();
    cudaError_t err = cudaSuccess;
    const int sms = sm_count(device, &err);
    if (err != cudaSuccess) return err;
    return launch(sms);
}

}  // namespace atv

#endif  // ATV_LAUNCH_CUH
