// The recurrence on the CPU: the same two entry points as the Triton backend.
//
//   rnn_fwd(proj, ids, w_h, b_h, h0) -> ws [B, T+1, H]: ws[:, 0] = h0, ws[:, t+1] = h_t
//       h_t = tanh((h_{t-1} + relu(p_t)) @ W_h^T + b_h), p_t = proj[ids[:, t]] (token input)
//       or proj[:, t] (dense input, proj [B, T, H]).
//   rnn_bwd_chain(grad_out, grad_h_n, ws, w_h) -> c [B, T+1, H]: c[:, T] = grad_h_n and
//       c[:, t] = ((grad_out[:, t] + c[:, t+1]) * (1 - h_t^2)) @ W_h.
//
// Batch rows are independent through all T steps, so each thread takes a block of rows and runs
// the whole time loop on it: no synchronisation between steps. Per step it does one fused
// elementwise pass, one GEMM on its rows (single-threaded BLAS inside the parallel region) and,
// forward, tanh in place. The weight gradients are left to large GEMMs after the loop (Python).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

void check_weights(const at::Tensor& w_h) {
  TORCH_CHECK_VALUE(w_h.device().is_cpu(), "the cpu backend needs CPU tensors, got w_h on ", w_h.device());
  TORCH_CHECK_TYPE(w_h.scalar_type() == at::kFloat || w_h.scalar_type() == at::kDouble,
                   "the cpu backend supports float32 and float64, got ", w_h.scalar_type());
  TORCH_CHECK_VALUE(w_h.dim() == 2 && w_h.size(0) == w_h.size(1) && w_h.size(0) > 0,
                    "w_h must be square [H, H], got ", w_h.sizes());
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& w_h, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device() == w_h.device(), name, " must be on ", w_h.device(), ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == w_h.scalar_type(), name, " must be ", w_h.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// Splits [0, B) into one block per thread.
int64_t grain(int64_t B) {
  int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, (B + threads - 1) / threads);
}

}  // namespace

at::Tensor rnn_fwd(const at::Tensor& proj_in, const c10::optional<at::Tensor>& ids_in, const at::Tensor& w_h_in,
                   const c10::optional<at::Tensor>& b_h_in, const c10::optional<at::Tensor>& h0_in) {
  check_weights(w_h_in);
  const int64_t H = w_h_in.size(0);
  const bool tokens = ids_in.has_value();
  int64_t B, T;
  at::Tensor ids;
  if (tokens) {
    ids = ids_in->contiguous();
    TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
    TORCH_CHECK_VALUE(ids.dim() == 2, "ids must be [B, T], got ", ids.sizes());
    TORCH_CHECK_VALUE(proj_in.dim() == 2 && proj_in.size(1) == H, "token input needs proj [V, ", H, "], got ",
                      proj_in.sizes());
    check_like("proj", proj_in, w_h_in, proj_in.sizes());
    B = ids.size(0);
    T = ids.size(1);
    if (ids.numel() > 0) {
      const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
      TORCH_CHECK_INDEX(lo >= 0 && hi < proj_in.size(0), "token ids must lie in [0, ", proj_in.size(0),
                        "), got values in [", lo, ", ", hi, "]");
    }
  } else {
    TORCH_CHECK_VALUE(proj_in.dim() == 3 && proj_in.size(2) == H, "dense input needs proj [B, T, ", H, "], got ",
                      proj_in.sizes());
    check_like("proj", proj_in, w_h_in, proj_in.sizes());
    B = proj_in.size(0);
    T = proj_in.size(1);
  }
  TORCH_CHECK_VALUE(B > 0 && T > 0, "empty batch or sequence: B=", B, ", T=", T);
  if (b_h_in) check_like("b_h", *b_h_in, w_h_in, {H});
  if (h0_in) check_like("h0", *h0_in, w_h_in, {B, H});

  const at::Tensor proj = proj_in.contiguous();
  const at::Tensor w_h_t = w_h_in.t();  // a transposed view: BLAS reads it without a copy
  const at::Tensor b_h = b_h_in ? b_h_in->contiguous() : at::Tensor();
  at::Tensor ws = at::empty({B, T + 1, H}, w_h_in.options());
  if (h0_in) {
    ws.select(1, 0).copy_(*h0_in);
  } else {
    ws.select(1, 0).zero_();
  }

  AT_DISPATCH_FLOATING_TYPES(ws.scalar_type(), "rnn_fwd", [&] {
    const scalar_t* proj_p = proj.data_ptr<scalar_t>();
    const int64_t* ids_p = tokens ? ids.data_ptr<int64_t>() : nullptr;
    scalar_t* ws_p = ws.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(B), [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      at::Tensor a = at::empty({n, H}, ws.options());
      scalar_t* a_p = a.data_ptr<scalar_t>();
      at::Tensor rows = ws.narrow(0, b0, n);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < n; ++i) {  // a = h_{t-1} + relu(p_t)
          const int64_t b = b0 + i;
          const scalar_t* p = proj_p + (tokens ? ids_p[b * T + t] : b * T + t) * H;
          const scalar_t* h = ws_p + (b * (T + 1) + t) * H;
          scalar_t* out = a_p + i * H;
          for (int64_t j = 0; j < H; ++j) out[j] = h[j] + std::max(p[j], scalar_t(0));
        }
        at::Tensor h_t = rows.select(1, t + 1);
        if (b_h.defined()) {
          at::addmm_out(h_t, b_h, a, w_h_t);
        } else {
          at::mm_out(h_t, a, w_h_t);
        }
        h_t.tanh_();
      }
    });
  });
  return ws;
}

at::Tensor rnn_bwd_chain(const at::Tensor& grad_out_in, const at::Tensor& grad_h_n, const at::Tensor& ws,
                         const at::Tensor& w_h) {
  check_weights(w_h);
  TORCH_CHECK_VALUE(ws.dim() == 3 && ws.size(2) == w_h.size(0) && ws.size(1) >= 2 && ws.is_contiguous(),
                    "ws must be a contiguous [B, T+1, H] workspace from rnn_fwd, got ", ws.sizes());
  const int64_t B = ws.size(0), T = ws.size(1) - 1, H = ws.size(2);
  check_like("ws", ws, w_h, ws.sizes());
  check_like("grad_out", grad_out_in, w_h, {B, T, H});
  check_like("grad_h_n", grad_h_n, w_h, {B, H});
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor c = at::empty_like(ws);
  c.select(1, T).copy_(grad_h_n);

  AT_DISPATCH_FLOATING_TYPES(ws.scalar_type(), "rnn_bwd_chain", [&] {
    const scalar_t* go_p = grad_out.data_ptr<scalar_t>();
    const scalar_t* ws_p = ws.data_ptr<scalar_t>();
    scalar_t* c_p = c.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(B), [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      at::Tensor dz = at::empty({n, H}, ws.options());
      scalar_t* dz_p = dz.data_ptr<scalar_t>();
      at::Tensor rows = c.narrow(0, b0, n);
      for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t i = 0; i < n; ++i) {  // dz_t = (grad_out_t + c_{t+1}) * (1 - h_t^2)
          const int64_t b = b0 + i;
          const scalar_t* go = go_p + (b * T + t) * H;
          const scalar_t* cn = c_p + (b * (T + 1) + t + 1) * H;
          const scalar_t* h = ws_p + (b * (T + 1) + t + 1) * H;
          scalar_t* out = dz_p + i * H;
          for (int64_t j = 0; j < H; ++j) out[j] = (go[j] + cn[j]) * (scalar_t(1) - h[j] * h[j]);
        }
        at::Tensor c_t = rows.select(1, t);
        at::mm_out(c_t, dz, w_h);
      }
    });
  });
  return c;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn: the Elman recurrence on the CPU (forward and the BPTT chain)";
  m.def("rnn_fwd", &rnn_fwd, "forward over all steps; returns the [B, T+1, H] state workspace",
        py::arg("proj"), py::arg("ids"), py::arg("w_h"), py::arg("b_h"), py::arg("h0"));
  m.def("rnn_bwd_chain", &rnn_bwd_chain, "the reverse-time chain c_t = dz_t @ W_h; returns [B, T+1, H]",
        py::arg("grad_out"), py::arg("grad_h_n"), py::arg("ws"), py::arg("w_h"));
}
