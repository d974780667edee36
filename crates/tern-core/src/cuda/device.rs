//! A thin layer over the CUDA driver API and cuBLAS (through cudarc's raw bindings, loaded at
//! run time): one context and stream per `Gpu`, device buffers, kernel launches, events and
//! graph capture. cudarc's safe wrappers track events per buffer for multi-stream use; tern
//! runs everything on one stream, so it calls the driver directly and pays no such cost.

use super::ops::GemmOut;
use anyhow::{bail, Context, Result};
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys, CudaContext};
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// The kernels compiled by build.rs.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// Shared memory a kernel may ask for beyond the default 48 KiB (decode attention's per-warp outputs).
pub const MAX_DYNAMIC_SMEM: usize = 96 * 1024;

/// Checks that the NVIDIA driver library can be loaded, so that a machine without one gets a
/// clear error instead of a panic inside the bindings.
fn driver_present() -> Result<()> {
    for name in ["libcuda.so.1", "libcuda.so"] {
        // SAFETY: loading the driver library runs only its initializers.
        if unsafe { libloading::Library::new(name) }.is_ok() {
            return Ok(());
        }
    }
    bail!("no NVIDIA driver found (libcuda.so.1 cannot be loaded): `--device cuda` needs an NVIDIA GPU and its driver")
}

/// One GPU: its context (current on the thread that made it), a stream, the kernels and cuBLAS.
pub struct Gpu {
    _ctx: Arc<CudaContext>,
    pub stream: sys::CUstream,
    module: sys::CUmodule,
    blas: blas_sys::cublasHandle_t,
    _blas_workspace: DevBuf,
    pub name: String,
    pub sm_count: usize,
    pub ordinal: usize,
    /// Launch kernels with programmatic dependent launch (Hopper and later; `TERN_CUDA_PDL=0`
    /// turns it off).
    pdl: bool,
}

impl Gpu {
    /// Opens GPU `ordinal` on the calling thread (which must be the one that uses it).
    pub fn open(ordinal: usize) -> Result<Gpu> {
        driver_present()?;
        let count = CudaContext::device_count().context("cannot initialize the CUDA driver")?;
        if ordinal >= count.max(0) as usize {
            bail!("no CUDA device {ordinal}: {count} device(s) found");
        }
        let ctx = CudaContext::new(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
        ctx.bind_to_thread()?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sm_count = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let pdl = ctx.compute_capability()?.0 >= 9 && std::env::var("TERN_CUDA_PDL").map_or(true, |v| v != "0");
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)?;
        // SAFETY: FATBIN is a complete fatbin image produced by nvcc.
        let module = unsafe { drv::module::load_data(FATBIN.as_ptr() as *const c_void) }
            .context("cannot load tern's CUDA kernels (built for another GPU architecture? see CUDA_COMPUTE_CAP)")?;
        let blas = blas::create_handle().context("cannot create a cuBLAS handle")?;
        // A workspace of our own: cuBLAS must not allocate while a graph is being captured.
        let workspace = DevBuf::alloc(32 << 20)?;
        unsafe {
            blas::set_stream(blas, stream as blas_sys::cudaStream_t)?;
            blas_sys::cublasSetWorkspace_v2(blas, workspace.ptr as *mut c_void, workspace.bytes).result()?;
        }
        Ok(Gpu { _ctx: ctx, stream, module, blas, _blas_workspace: workspace, name, sm_count, ordinal, pdl })
    }

    pub fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let c = CString::new(name)?;
        // SAFETY: the module is loaded and outlives its functions (both owned by self).
        let f = unsafe { drv::module::get_function(self.module, c) }.with_context(|| format!("no kernel {name}"))?;
        Ok(f)
    }

    /// Raises a kernel's dynamic shared-memory limit to `MAX_DYNAMIC_SMEM`.
    ///
    /// # Safety
    /// `f` must be a function of this GPU's module.
    pub unsafe fn allow_large_smem(&self, f: sys::CUfunction) -> Result<()> {
        drv::function::set_function_attribute(
            f,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            MAX_DYNAMIC_SMEM as i32,
        )?;
        Ok(())
    }

    /// Launches `f` on the stream. `args` are pointers to each kernel argument's value.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and layout, and every
    /// device pointer among them must be valid for what the kernel does with it.
    pub unsafe fn launch(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: impl BlockShape,
        smem: usize,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let block = block.dims();
        if !self.pdl {
            return drv::launch_kernel(f, grid, block, smem as u32, self.stream, args).context("kernel launch failed");
        }
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: smem as u32,
            hStream: self.stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut())
            .result()
            .context("kernel launch failed")
    }

    pub fn synchronize(&self) -> Result<()> {
        unsafe { drv::stream::synchronize(self.stream) }.context("the GPU reported an error")
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        Ok(drv::mem_get_info()?)
    }

    /// Host → device, ordered on the stream. The host memory must stay untouched until the
    /// stream reaches the copy (callers synchronize, or use memory that lives long enough).
    pub fn upload<T: Copy>(&self, dst: &DevBuf, offset_bytes: usize, src: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(src);
        if offset_bytes + bytes > dst.bytes {
            bail!("upload of {bytes} bytes at {offset_bytes} overruns a {}-byte buffer", dst.bytes);
        }
        unsafe { drv::memcpy_htod_async(dst.ptr + offset_bytes as u64, src, self.stream) }?;
        Ok(())
    }

    /// Device → host; synchronizes the stream first so the data is there on return.
    pub fn download<T: Copy>(&self, src: &DevBuf, offset_bytes: usize, dst: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(dst);
        if offset_bytes + bytes > src.bytes {
            bail!("download of {bytes} bytes at {offset_bytes} overruns a {}-byte buffer", src.bytes);
        }
        unsafe { drv::memcpy_dtoh_async(dst, src.ptr + offset_bytes as u64, self.stream) }?;
        self.synchronize()
    }

    /// A buffer holding `data`, uploaded synchronously.
    pub fn buffer_from<T: Copy>(&self, data: &[T]) -> Result<DevBuf> {
        let b = DevBuf::alloc(std::mem::size_of_val(data).max(1))?;
        self.upload(&b, 0, data)?;
        self.synchronize()?;
        Ok(b)
    }

    pub fn copy_device(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream) }?;
        Ok(())
    }

    /// C (n × m, row-major) = A (n × k, row-major bf16) · Wᵀ (W: m × k row-major bf16), into an
    /// f32 C (plus beta·C) or a bf16 one.
    ///
    /// # Safety
    /// The pointers must hold matrices of those shapes.
    pub unsafe fn gemm_bf16(&self, w: u64, a: u64, out: GemmOut, m: usize, n: usize, k: usize) -> Result<()> {
        // Column-major view: Cᵀ (m × n) = W (k × m col-major, transposed) · Aᵀ (k × n).
        let (c, c_type, beta) = match out {
            GemmOut::F32 { c, beta } => (c, blas_sys::cudaDataType::CUDA_R_32F, beta),
            GemmOut::Bf16(c) => (c, blas_sys::cudaDataType::CUDA_R_16BF, 0.0f32),
        };
        let alpha = 1.0f32;
        blas::gemm_ex(
            self.blas,
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            w as *const c_void,
            blas_sys::cudaDataType::CUDA_R_16BF,
            k as i32,
            a as *const c_void,
            blas_sys::cudaDataType::CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            c_type,
            m as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .context("cuBLAS GEMM failed")
    }

    /// Starts recording the stream's work into a graph instead of running it.
    pub fn begin_capture(&self) -> Result<()> {
        unsafe {
            drv::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        }?;
        Ok(())
    }

    /// Ends the capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<Graph> {
        let graph = unsafe { drv::stream::end_capture(self.stream) }?;
        if graph.is_null() {
            bail!("graph capture produced no graph");
        }
        let exec = unsafe { drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        unsafe { drv::graph::destroy(graph) }?;
        Ok(Graph { exec: exec.context("cannot instantiate a CUDA graph")? })
    }

    pub fn replay(&self, g: &Graph) -> Result<()> {
        unsafe { drv::graph::launch(g.exec, self.stream) }.context("graph launch failed")
    }

    /// Milliseconds the stream spends on `work` (events around it, synchronized).
    pub fn time_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f32> {
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let (a, b) = (drv::event::create(flags)?, drv::event::create(flags)?);
        let run = (|| -> Result<f32> {
            unsafe { drv::event::record(a, self.stream) }?;
            work()?;
            unsafe { drv::event::record(b, self.stream) }?;
            unsafe { drv::event::synchronize(b) }?;
            Ok(unsafe { drv::event::elapsed(a, b) }?)
        })();
        unsafe {
            let _ = drv::event::destroy(a);
            let _ = drv::event::destroy(b);
        }
        run
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::stream::synchronize(self.stream);
            let _ = blas::destroy_handle(self.blas);
            let _ = drv::module::unload(self.module);
            let _ = drv::stream::destroy(self.stream);
        }
    }
}

/// Where time goes in the forward pass, when `TERN_CUDA_PROFILE` is set: `ops` puts events
/// around each operation (graphs off, so launch gaps show), `steps` around each whole step
/// (graphs on) and also records the host's wall time per step.
pub struct Profiler {
    pub per_op: bool,
    spans: std::cell::RefCell<Vec<(String, sys::CUevent, sys::CUevent)>>,
    totals: std::cell::RefCell<std::collections::BTreeMap<String, (f64, u64)>>,
}

impl Profiler {
    pub fn from_env() -> Option<Profiler> {
        let mode = std::env::var("TERN_CUDA_PROFILE").ok()?;
        Some(Profiler { per_op: mode != "steps", spans: Default::default(), totals: Default::default() })
    }

    /// Adds a time measured on the host.
    pub fn add(&self, name: &str, ms: f64) {
        let mut totals = self.totals.borrow_mut();
        let t = totals.entry(name.to_string()).or_default();
        t.0 += ms;
        t.1 += 1;
    }

    /// Runs `f`, which enqueues work on the stream, between two events.
    pub fn span<R>(&self, gpu: &Gpu, name: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let (a, b) = (drv::event::create(flags)?, drv::event::create(flags)?);
        unsafe { drv::event::record(a, gpu.stream) }?;
        let r = f();
        unsafe { drv::event::record(b, gpu.stream) }?;
        self.spans.borrow_mut().push((name.to_string(), a, b));
        r
    }

    /// Adds the finished spans to the totals (call after the stream is synchronized).
    pub fn collect(&self) {
        let mut totals = self.totals.borrow_mut();
        for (name, a, b) in self.spans.borrow_mut().drain(..) {
            let ms = unsafe { drv::event::elapsed(a, b) }.unwrap_or(0.0) as f64;
            let t = totals.entry(name).or_default();
            t.0 += ms;
            t.1 += 1;
            unsafe {
                let _ = drv::event::destroy(a);
                let _ = drv::event::destroy(b);
            }
        }
    }

    /// A table of the totals, largest first.
    pub fn report(&self) -> String {
        let totals = self.totals.borrow();
        let all: f64 = totals.values().map(|t| t.0).sum();
        let mut rows: Vec<_> = totals.iter().collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let mut out = format!("time by operation ({all:.1} ms in all)\n| operation | calls | total ms | µs per call | share |\n|---|---|---|---|---|\n");
        for (name, (ms, n)) in rows {
            out += &format!(
                "| {name} | {n} | {ms:.2} | {:.1} | {:.1}% |\n",
                1e3 * ms / *n as f64,
                100.0 * ms / all.max(1e-9)
            );
        }
        out
    }
}

/// An instantiated CUDA graph.
pub struct Graph {
    exec: sys::CUgraphExec,
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::graph::exec_destroy(self.exec);
        }
    }
}

/// Device memory, freed on drop (on the thread whose context is current).
pub struct DevBuf {
    pub ptr: u64,
    pub bytes: usize,
}

impl DevBuf {
    pub fn alloc(bytes: usize) -> Result<DevBuf> {
        let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }
            .with_context(|| format!("cannot allocate {:.1} MiB of GPU memory", bytes as f64 / (1 << 20) as f64))?;
        Ok(DevBuf { ptr, bytes })
    }

    /// Address of the element `i` of type T.
    pub fn at<T>(&self, i: usize) -> u64 {
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::free_sync(self.ptr);
        }
    }
}

/// A thread block's shape: a thread count, or (x, y, z).
pub trait BlockShape {
    fn dims(self) -> (u32, u32, u32);
}

impl BlockShape for u32 {
    fn dims(self) -> (u32, u32, u32) {
        (self, 1, 1)
    }
}

impl BlockShape for (u32, u32, u32) {
    fn dims(self) -> (u32, u32, u32) {
        self
    }
}

/// Launches a kernel: `launch!(gpu, function, grid, block, smem; arg, ...)`. Each argument
/// must be `Copy` and laid out as the kernel's parameter (u64 device pointers, i32, f32,
/// `#[repr(C)]` structs). The argument values are temporaries of the one call expression, so
/// their addresses stay valid for the launch.
#[macro_export]
macro_rules! launch {
    ($gpu:expr, $f:expr, $grid:expr, $block:expr, $smem:expr; $($a:expr),* $(,)?) => {
        $gpu.launch($f, $grid, $block, $smem, &mut [$(&$a as *const _ as *mut ::std::ffi::c_void),*])
    };
}
