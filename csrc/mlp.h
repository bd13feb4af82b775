// What every op knows about an MLP, in one place: the kind and activation strings, the rules of a
// parameter list (one check for mlp_fvp, mlp_cg, mlp_act and mlp_value_fit, with one exception type
// per kind of mistake: wrong dtype or device -> TypeError, wrong shape, count, layout or value ->
// ValueError; messages name the argument), and the forward pass.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "elementwise.h"

namespace trpo_ext {

// ---- Activations (the list is TRPO_EXT_ACTIVATIONS in elementwise.h) -------------------------------

enum class Activation {
#define TRPO_EXT_ACTIVATION_ENUM(E, name, Op) E,
  TRPO_EXT_ACTIVATIONS(TRPO_EXT_ACTIVATION_ENUM)
#undef TRPO_EXT_ACTIVATION_ENUM
};

// Indexed by Activation.
inline constexpr const char* kActivationNames[] = {
#define TRPO_EXT_ACTIVATION_NAME(E, name, Op) name,
    TRPO_EXT_ACTIVATIONS(TRPO_EXT_ACTIVATION_NAME)
#undef TRPO_EXT_ACTIVATION_NAME
};

// ValueError naming the accepted activations unless `activation` is one of them.
Activation parse_activation(c10::string_view activation);

// Calls f(Op{}) with the elementwise.h struct of `act` (ew::TanhAct, ...): how the kernels turn the
// runtime enum into a compile-time formula.
template <typename F>
void visit_activation(Activation act, F&& f) {
  switch (act) {
#define TRPO_EXT_ACTIVATION_CASE(E, name, Op) \
  case Activation::E:                         \
    f(ew::Op{});                              \
    return;
    TRPO_EXT_ACTIVATIONS(TRPO_EXT_ACTIVATION_CASE)
#undef TRPO_EXT_ACTIVATION_CASE
  }
  TORCH_CHECK(false, "trpo_ext: unknown activation ", static_cast<int>(act));
}

// ---- Kinds and the parameter list ---------------------------------------------------------------------

// What follows the layers and what the output is: a policy's logits (categorical: softmaxes, see
// distribution.h), a policy's mean followed by a log_std parameter (gaussian), a policy's logits of
// independent Bernoullis (bernoulli), a critic's single value output (value).
enum class MlpKind { Categorical, Gaussian, Bernoulli, Value };

// "categorical", "gaussian" or "bernoulli" (ValueError otherwise); Value is not a policy kind.
MlpKind parse_kind(c10::string_view kind);

// How obs relates to the parameters.
enum class ObsRule {
  Match,    // obs is float32/float64 and the parameters must have its dtype (mlp_fvp, mlp_cg, critic)
  Convert,  // obs may be any real dtype, converted to the parameters' (mlp_act); may be an empty batch
};

struct MlpShape {
  int64_t n_layers = 0;   // linear layers
  int64_t out_width = 0;  // units of the output layer
  int64_t numel = 0;      // total parameter count, the length of a flat vector over params
  at::ScalarType dtype;   // of the parameters
};

// Checks obs (2-D, (N, in)) and params ([W1, b1, ..., WL, bL] + [log_std] for Gaussian) against each
// other: every tensor on obs's device with the parameters' dtype (TypeError), every layer chaining
// with at least one unit (ValueError), a Value MLP ending in one unit. Params may have any strides.
// `first`: where params starts in the op's own list (a recurrent policy's head, csrc/recurrent.cpp),
// for the messages; obs is then the head's input as the RNN makes it.
MlpShape check_mlp(const at::Tensor& obs, at::TensorList params, MlpKind kind, ObsRule rule, int64_t first = 0);

// TypeError unless t has `dtype` and is on `device`; `like` names where they come from ("obs's").
// `name` is only built on failure: a callable returning something printable, or a string.
template <typename Name>
void check_dtype_device(const at::Tensor& t, const Name& name, at::ScalarType dtype, const at::Device& device,
                        const char* like) {
  auto str = [&]() -> std::string {
    if constexpr (std::is_invocable_v<const Name&>) {
      return c10::str(name());
    } else {
      return c10::str(name);
    }
  };
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "trpo_ext: ", str(), " must have ", like, " dtype ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_TYPE(t.device() == device, "trpo_ext: ", str(), " must be on ", like, " device ", device, ", got ",
                   t.device());
}

// ValueError unless t is contiguous (dense, non-overlapping, row-major strides): for tensors an op
// writes in place, which cannot be copied to a contiguous one.
template <typename Name>
void check_dense(const at::Tensor& t, const Name& name) {
  if (t.is_contiguous()) return;
  if constexpr (std::is_invocable_v<const Name&>) {
    TORCH_CHECK_VALUE(false, "trpo_ext: ", name(), " must be contiguous (dense, with row-major strides), got strides ",
                      t.strides(), " for shape ", t.sizes());
  } else {
    TORCH_CHECK_VALUE(false, "trpo_ext: ", name, " must be contiguous (dense, with row-major strides), got strides ",
                      t.strides(), " for shape ", t.sizes());
  }
}

// "params[2] (weight of layer 1)", "params[4] (log_std)", ...; with `first` > 0 (a recurrent policy's
// head, from the op's params[first]): "params[first + 2] (weight of head layer 1)".
std::string param_name(int64_t index, int64_t n_layers, int64_t first = 0);

// ---- Forward pass ------------------------------------------------------------------------------------

// The output of the MLP params[0 .. 2 n_layers) on x (contiguous (N, in)), hidden activations applied in
// place. With `inputs`, it receives h_0 = x, ..., h_{L-1} (the input of each layer); with `act_grads`,
// act'(z_l) of each hidden layer (the derivative of elementwise.h's formula). Without `with_output`
// the output layer is not run (its input still goes to `inputs`) and the result is undefined.
at::Tensor mlp_forward(const at::Tensor& x, at::TensorList params, int64_t n_layers, Activation act,
                       std::vector<at::Tensor>* inputs = nullptr, std::vector<at::Tensor>* act_grads = nullptr,
                       bool with_output = true);

}  // namespace trpo_ext
