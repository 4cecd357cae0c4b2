// The table of contents of torch_moe: every op schema, one comment line each. Kernels live per op folder.
#include <torch/library.h>

TORCH_LIBRARY(torch_moe, m) {
  // Fake (meta) kernels for every op are registered from Python in this module.
  m.set_python_module("torch_moe._fake");

  // Routing: scores logits [T, E] (softmax | sigmoid), picks top-k by score + selection_bias (ties to the lower
  // expert id) inside the topk_groups best of n_groups expert groups (a group ranks by its two best biased scores),
  // renormalises the chosen unbiased scores if asked -> (weights [T, k], expert_ids [T, k], scores [T, E]).
  m.def("router_topk(Tensor logits, int k, str score_func=\"softmax\", Tensor? selection_bias=None, "
        "bool normalize=True, int n_groups=1, int topk_groups=1) -> (Tensor weights, Tensor expert_ids, "
        "Tensor scores)");
  // Backward of router_topk: grad_weights [T, k] -> grad_logits [T, E].
  m.def("_router_topk_backward(Tensor grad_weights, Tensor logits, Tensor expert_ids, str score_func, "
        "bool normalize) -> Tensor");

  // Expert-choice routing: probs = softmax(logits [T, E]); each expert takes the `capacity` valid tokens of highest
  // prob (ties to the lower token index) -> (weights [T, E] = probs where taken else 0, slots [T, E] (-1: not taken),
  // token_ids [E, C] (-1: empty slot), scores [T, E] = probs).
  m.def("expert_choice(Tensor logits, SymInt capacity, Tensor? valid_mask=None) -> (Tensor weights, Tensor slots, "
        "Tensor token_ids, Tensor scores)");
  // Backward of expert_choice: grad_weights [T, E] -> grad_logits [T, E].
  m.def("_expert_choice_backward(Tensor grad_weights, Tensor logits, Tensor slots) -> Tensor");

  // DSelect-k gate: with S the smooth-step of width gamma of code_logits [T, k, m = ceil(log2 E)], selector outputs
  // r [T, k, E] = product over the bits of expert j of S or 1 - S (codes >= E never formed), and the mixture
  // weights q [T, E] = sum_i softmax(selector_logits [T, k])_i r_i -> (weights q, selector_outputs r).
  m.def("dselect_k_gate(Tensor code_logits, Tensor selector_logits, int num_experts, float gamma=1.0) -> "
        "(Tensor weights, Tensor selector_outputs)");
  // Backward of dselect_k_gate: (grad_weights [T, E], grad_selector_outputs [T, k, E]) -> grads of both logits.
  m.def("_dselect_k_gate_backward(Tensor grad_weights, Tensor grad_selector_outputs, Tensor code_logits, "
        "Tensor selector_logits, int num_experts, float gamma) -> (Tensor, Tensor)");

  // Capacity plan: slot of every assignment in its expert's buffer (-1: dropped or padding),
  // tokens_per_expert [E] before dropping and kept_per_expert [E]; policy "position" or "probability".
  m.def("capacity_plan(Tensor expert_ids, int num_experts, SymInt capacity, str drop_policy=\"position\", "
        "Tensor? priority=None, Tensor? valid_mask=None) -> (Tensor slots, Tensor tokens_per_expert, "
        "Tensor kept_per_expert)");

  // Dispatch: x [T, d] -> buffer [E, C, d], buffer[e, s] = x[t] for every kept assignment, empty slots zero.
  m.def("dispatch(Tensor x, Tensor expert_ids, Tensor slots, int num_experts, SymInt capacity) -> Tensor");
  // Backward of dispatch: grad_buffer [E, C, d] -> grad_x [T, d].
  m.def("_dispatch_backward(Tensor grad_buffer, Tensor expert_ids, Tensor slots) -> Tensor");
  // Combine: y[t] = sum over kept j of weights[t, j] * buffer[expert_ids[t, j], slots[t, j]], fp32 accumulation.
  m.def("combine(Tensor buffer, Tensor weights, Tensor expert_ids, Tensor slots) -> Tensor");
  // Backward of combine -> (grad_buffer [E, C, d], grad_weights [T, k]).
  m.def("_combine_backward(Tensor grad_y, Tensor buffer, Tensor weights, Tensor expert_ids, Tensor slots) "
        "-> (Tensor, Tensor)");

  // Dropless permute: x [T, d] -> rows [T*k, d] grouped by expert (token order inside), row_index [T, k]
  // (-1 for padding), offsets [E + 1]; rows past offsets[E] (padding) are zero.
  m.def("permute(Tensor x, Tensor expert_ids, int num_experts, Tensor? valid_mask=None) "
        "-> (Tensor rows, Tensor row_index, Tensor offsets)");
  // Backward of permute: grad_rows [N, d] -> grad_x [T, d].
  m.def("_permute_backward(Tensor grad_rows, Tensor row_index) -> Tensor");
  // Dropless unpermute: y[t] = sum_j weights[t, j] * rows[row_index[t, j]], fp32 accumulation.
  m.def("unpermute(Tensor rows, Tensor weights, Tensor row_index) -> Tensor");
  // Backward of unpermute -> (grad_rows [N, d], grad_weights [T, k]).
  m.def("_unpermute_backward(Tensor grad_y, Tensor rows, Tensor weights, Tensor row_index) -> (Tensor, Tensor)");

  // Grouped GEMM: out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ b[e] for a [N, K], b [E, K, M];
  // rows past offsets[E] are zero. The dropless expert compute.
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets) -> Tensor");
  // Backward of grouped_mm -> (grad_a [N, K], grad_b [E, K, M]); an output whose output_mask entry is false is not
  // computed and comes back undefined (None), as aten's convolution_backward does. The same for every backward below.
  m.def("_grouped_mm_backward(Tensor grad_out, Tensor a, Tensor b, Tensor offsets, bool[2] output_mask=[True, True]) "
        "-> (Tensor, Tensor)");
  // Dropless plan alone: (row_index [T, k], offsets [E + 1]) as permute gives them, without moving any row.
  m.def("permute_plan(Tensor expert_ids, int num_experts, Tensor? valid_mask=None) "
        "-> (Tensor row_index, Tensor offsets)");
  // grouped_mm of the permuted tokens without keeping them: rows[row_index[t, j]] = x[t], x [T, K] -> [T*k, M].
  m.def("gather_grouped_mm(Tensor x, Tensor b, Tensor offsets, Tensor row_index) -> Tensor");
  // Backward of gather_grouped_mm -> (grad_x [T, K], grad_b [E, K, M]).
  m.def("_gather_grouped_mm_backward(Tensor grad_out, Tensor x, Tensor b, Tensor offsets, Tensor row_index, "
        "bool[2] output_mask=[True, True]) -> (Tensor, Tensor)");
  // Gated first half of a SwiGLU/GeGLU expert on the permuted tokens: gate = rows @ w_gate[e], up = rows @ w_up[e],
  // act = f(gate) * up with f = silu | gelu (exact) | gelu_tanh -> (act, gate, up) [T*k, M]; gate and up are kept
  // for backward and are not differentiable outputs.
  m.def("gather_grouped_glu(Tensor x, Tensor w_gate, Tensor w_up, Tensor offsets, Tensor row_index, "
        "str activation=\"silu\") -> (Tensor act, Tensor gate, Tensor up)");
  // Backward of gather_grouped_glu -> (grad_x [T, K], grad_w_gate [E, K, M], grad_w_up [E, K, M]).
  m.def("_gather_grouped_glu_backward(Tensor grad_act, Tensor x, Tensor w_gate, Tensor w_up, Tensor gate, "
        "Tensor up, Tensor offsets, Tensor row_index, str activation, bool[3] output_mask=[True, True, True]) "
        "-> (Tensor, Tensor, Tensor)");
  // Gated activation on whole tensors: act = f(gate) * up, f = silu | gelu (exact) | gelu_tanh, gate and up [N, M].
  m.def("glu(Tensor gate, Tensor up, str activation=\"silu\") -> Tensor");
  // Backward of glu -> (grad_gate, grad_up) [N, M].
  m.def("_glu_backward(Tensor grad_act, Tensor gate, Tensor up, str activation, bool[2] output_mask=[True, True]) "
        "-> (Tensor, Tensor)");
  // grouped_mm then unpermute, without keeping the expert outputs: y[t] = sum_j weights[t, j] * (h @ b[e])[row].
  m.def("grouped_mm_unpermute(Tensor h, Tensor b, Tensor offsets, Tensor weights, Tensor row_index) -> Tensor");
  // Backward of grouped_mm_unpermute -> (grad_h [N, K], grad_b [E, K, M], grad_weights [T, k]).
  m.def("_grouped_mm_unpermute_backward(Tensor grad_y, Tensor h, Tensor b, Tensor offsets, Tensor weights, "
        "Tensor row_index, bool[3] output_mask=[True, True, True]) -> (Tensor, Tensor, Tensor)");

  // Aux losses over valid tokens: (Switch load-balancing loss, router z-loss, router entropy (not differentiable)).
  m.def("router_losses(Tensor logits, Tensor expert_ids, Tensor? valid_mask=None) "
        "-> (Tensor load_balancing_loss, Tensor z_loss, Tensor router_entropy)");
  // Shazeer et al. (2017)'s smooth load of noisy top-k gating: load [E] = sum over valid tokens of
  // Phi((clean - threshold) / noise_std), threshold the k-th (or, for experts in the top k, the (k+1)-th) largest
  // noisy logit of the token. Differentiable w.r.t. all three [T, E] inputs.
  m.def("noisy_topk_load(Tensor clean_logits, Tensor noisy_logits, Tensor noise_std, int k, Tensor? valid_mask=None) "
        "-> Tensor");
  // Backward of noisy_topk_load -> (grad_clean [T, E], grad_noisy [T, E], grad_noise_std [T, E]).
  m.def("_noisy_topk_load_backward(Tensor grad_load, Tensor clean_logits, Tensor noisy_logits, Tensor noise_std, "
        "int k, Tensor? valid_mask) -> (Tensor, Tensor, Tensor)");
  // Backward of router_losses: (grad_load_balancing, grad_z) -> grad_logits [T, E].
  m.def("_router_losses_backward(Tensor grad_load_balancing, Tensor grad_z, Tensor logits, Tensor expert_ids, "
        "Tensor? valid_mask) -> Tensor");
}
