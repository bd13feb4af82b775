// Op schemas of trpo_ext and the module init of trpo_ext._C. One registry, a CPU and (when built)
// a CUDA backend behind the dispatcher; fake kernels live in trpo_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "act.h"
#include "critic.h"
#include "fisher.h"
#include "recurrent.h"
#include "step.h"

extern "C" {
// An empty Python module: importing trpo_ext._C runs the static op registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace trpo_ext {

TORCH_LIBRARY(trpo_ext, m) {
  m.def("mlp_fvp(Tensor obs, Tensor[] params, Tensor v, str kind, str activation, float damping, "
        "int[]? segments=None, Tensor? action_mask=None) -> Tensor");
  m.def("mlp_cg(Tensor obs, Tensor[] params, Tensor b, str kind, str activation, float damping, "
        "int iters, float rtol, int[]? segments=None, Tensor? action_mask=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mlp_policy_direction(Tensor obs, Tensor[] params, Tensor actions, Tensor advantages, Tensor? fvp_obs, "
        "str kind, str activation, float damping, int iters, float rtol, str? group=None, int[]? segments=None, "
        "Tensor? action_mask=None, Tensor? fvp_action_mask=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mlp_policy_trial(Tensor obs, Tensor[] params, Tensor actions, Tensor advantages, Tensor old_dist_params, "
        "Tensor? old_log_std, str kind, str activation, str? group=None, int[]? segments=None, "
        "Tensor? action_mask=None) -> (Tensor, Tensor)");
  m.def("mlp_value_fit(Tensor obs, Tensor returns, Tensor(a!)[] params, Tensor(b!)[] exp_avg, "
        "Tensor(c!)[] exp_avg_sq, Tensor(d!)[] steps, Tensor order, int batch_size, float lr, float beta1, "
        "float beta2, float eps, str activation, str? group=None) -> Tensor");
  m.def("mlp_act(Tensor obs, Tensor? obs_mean, Tensor? obs_inv_std, float obs_clip, Tensor[] params, str kind, "
        "str activation, bool deterministic, Generator? generator, int[]? segments=None, Tensor? action_mask=None) "
        "-> (Tensor, Tensor)");
  m.def("rnn_fvp(Tensor obs, Tensor episode_starts, Tensor[] initial_state, Tensor[] params, Tensor v, str cell, "
        "str kind, str activation, float damping, int[]? segments=None, Tensor? action_mask=None) -> Tensor");
  m.def("rnn_cg(Tensor obs, Tensor episode_starts, Tensor[] initial_state, Tensor[] params, Tensor b, str cell, "
        "str kind, str activation, float damping, int iters, float rtol, int[]? segments=None, "
        "Tensor? action_mask=None, float mean_over=0, str? group=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_built() -> bool", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

// The same functions serve every backend: they pick their kernels by the tensors' device (kernels.h).
static void register_kernels(torch::Library& m) {
  m.impl("mlp_fvp", &mlp_fvp);
  m.impl("mlp_cg", &mlp_cg);
  m.impl("mlp_policy_direction", &mlp_policy_direction);
  m.impl("mlp_policy_trial", &mlp_policy_trial);
  m.impl("mlp_value_fit", &mlp_value_fit);
  m.impl("mlp_act", &mlp_act);
  m.impl("rnn_fvp", &rnn_fvp);
  m.impl("rnn_cg", &rnn_cg);
}

TORCH_LIBRARY_IMPL(trpo_ext, CPU, m) { register_kernels(m); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(trpo_ext, CUDA, m) { register_kernels(m); }
#endif

}  // namespace trpo_ext
