"""Tiny random fp32 causal LMs of every Transformers family whose attention slides, to compare the rolling cache
with Transformers' eager path.

``FAMILIES[name].make_config(window)`` is a small config: hidden 64, 4 heads over 2 KV heads of dim 16, vocab 97,
untied embeddings (tied ones make these random models repeat one token), pad 0, no BOS/EOS so generation never
stops early, MoE cut to 4 experts top-2, soft-caps and rope at the family's defaults. Pure-sliding families window
every layer; hybrid ones have ``sliding_attention`` and ``full_attention`` layers. ``build(name, window, seed)``
is the model: random weights from ``seed``, eval, fp32, eager attention. Classes resolve on first use, so
importing this module imports no model code.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel

S, F = "sliding_attention", "full_attention"
HYBRID = (S, F, S, F)

_BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
    tie_word_embeddings=False,
)
_MOE = dict(
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_group=1,
    topk_group=1,
)


@dataclass(frozen=True)
class Family:
    name: str
    config_name: str  # attribute of `transformers`
    model_name: str
    hybrid: bool
    moe: bool = False
    layers: int | None = None  # default: len(layer_types), else 4 for hybrids, 2 otherwise
    fields: dict = field(default_factory=dict)  # config fields over the shared tiny sizes
    window_key: str = "sliding_window"
    window_scale: int = 1  # config[window_key] = window * window_scale
    kwargs: dict = field(default_factory=dict)  # non-field kwargs that __post_init__ pops
    notes: str = ""

    @property
    def config_class(self) -> type[PreTrainedConfig]:
        return getattr(transformers, self.config_name)

    @property
    def model_class(self) -> type[PreTrainedModel]:
        return getattr(transformers, self.model_name)

    def make_config(self, window: int) -> PreTrainedConfig:
        known = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = set(self.fields) - known
        if unknown:  # configs take unknown kwargs silently: a misspelt field would go unnoticed
            raise TypeError(f"{self.config_name} has no field(s) {sorted(unknown)}")
        shared = {k: v for k, v in {**_BASE, **(_MOE if self.moe else {})}.items() if k in known}
        values = copy.deepcopy({**shared, **self.fields, self.window_key: window * self.window_scale})
        if self.hybrid and "layer_types" in known and "max_window_layers" not in values:
            values.setdefault("layer_types", list(HYBRID))
        layers = self.layers or len(values.get("layer_types") or ()) or (4 if self.hybrid else 2)
        return self.config_class(**values, num_hidden_layers=layers, **copy.deepcopy(self.kwargs))


_ALL = [
    # ---- every layer slides; the model reads config.sliding_window at run time ----
    Family("mistral", "MistralConfig", "MistralForCausalLM", hybrid=False),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", hybrid=False, moe=True),
    Family("ministral", "MinistralConfig", "MinistralForCausalLM", hybrid=False, fields=dict(layer_types=[S, S]),
           notes="has layer_types (all sliding)"),
    Family("ministral3", "Ministral3Config", "Ministral3ForCausalLM", hybrid=False,
           fields=dict(max_position_embeddings=262144),  # yarn wants it above original_max_position_embeddings
           notes="yarn rope with llama_4_scaling_beta: queries scaled by position (position_ids passed to attention)"),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", hybrid=False, notes="fused qkv/gate_up; head_dim = hidden/heads"),
    Family("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", hybrid=False, notes="LayerNorm, biases"),
    Family("phimoe", "PhimoeConfig", "PhimoeForCausalLM", hybrid=False, moe=True,
           notes="no sliding_window= kwarg to attention: window only in the mask"),
    Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", hybrid=False, moe=True,
           fields=dict(use_sliding_window=True),
           notes="use_sliding_window=False (the default) sets sliding_window=None"),
    # ---- hybrid ----
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", hybrid=True, layers=4,
           fields=dict(use_sliding_window=True, max_window_layers=2),
           notes="layer_types derived: layers >= max_window_layers slide (needs use_sliding_window)"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", hybrid=True, layers=4,
           fields=dict(use_sliding_window=True, max_window_layers=2),
           notes="layer_types derived: layers >= max_window_layers slide (needs use_sliding_window); q/k norm"),
    Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", hybrid=True, moe=True, layers=4,
           fields=dict(use_sliding_window=True, max_window_layers=4),
           notes="layer_types derived: even layers below max_window_layers slide; no sliding_window= kwarg; "
           "sliding_window=0 when use_sliding_window=False"),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", hybrid=True, fields=dict(query_pre_attn_scalar=16),
           notes="attn softcap 50 (softcap=), final softcap 30; scaling query_pre_attn_scalar**-0.5"),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", hybrid=True, fields=dict(query_pre_attn_scalar=16),
           notes="rope per layer type (10k sliding, 1M full); q/k norm; "
           "use_bidirectional_attention=True adds or_mask_function"),
    Family("vaultgemma", "VaultGemmaConfig", "VaultGemmaForCausalLM", hybrid=True,
           fields=dict(query_pre_attn_scalar=16),
           notes="attn softcap 50 (softcap=), final softcap 30"),
    Family("cohere2", "Cohere2Config", "Cohere2ForCausalLM", hybrid=True,
           notes="rotary only on sliding layers (full layers NoPE); logit_scale; parallel block"),
    Family("cohere2_moe", "Cohere2MoeConfig", "Cohere2MoeForCausalLM", hybrid=True, moe=True,
           fields=dict(rms_norm_eps=1e-5), notes="as Cohere2"),
    Family("gpt_oss", "GptOssConfig", "GptOssForCausalLM", hybrid=True, moe=True, fields=dict(intermediate_size=32),
           notes="attention sinks (s_aux=); yarn rope"),
    Family("olmo3", "Olmo3Config", "Olmo3ForCausalLM", hybrid=True, notes="q/k norm over all heads"),
    Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", hybrid=True, fields=dict(use_sliding_window=True),
           notes="window needs use_sliding_window=True; no_rope_layers: every 4th layer NoPE"),
    Family("exaone4", "Exaone4Config", "Exaone4ForCausalLM", hybrid=True,
           notes="self_attn.sliding_window set on every layer; is_sliding picks; full layers NoPE"),
    Family("exaone_moe", "ExaoneMoeConfig", "ExaoneMoeForCausalLM", hybrid=True, moe=True,
           fields=dict(num_shared_experts=1), notes="as Exaone4"),
    Family("kolibri1", "Kolibri1Config", "Kolibri1ForCausalLM", hybrid=True, moe=True, notes="as Exaone4"),
    Family("afmoe", "AfmoeConfig", "AfmoeForCausalLM", hybrid=True, moe=True, fields=dict(num_shared_experts=1),
           notes="rotary only on sliding layers; sigmoid output gate"),
    Family("beam", "BeamConfig", "BeamForCausalLM", hybrid=True, moe=True,
           notes="rotary only on sliding layers (rope_parameters per type, full=None); output gate; final softcap 30"),
    Family("cwm", "CwmConfig", "CwmForCausalLM", hybrid=True,
           fields=dict(bos_token_id=1, max_position_embeddings=131072),  # llama3 rope: above its original 8192
           notes="llama3 rope; bos must be an int; eos None becomes [128001, 128008, 128009] (outside vocab)"),
    Family("dots1", "Dots1Config", "Dots1ForCausalLM", hybrid=True, moe=True, fields=dict(n_shared_experts=1)),
    Family("flint", "FlintConfig", "FlintForCausalLM", hybrid=True, moe=True,
           notes="sinks (s_aux=); rotary only on sliding layers"),
    Family("granite_swa", "GraniteSWAConfig", "GraniteSWAForCausalLM", hybrid=True,
           notes="sinks (s_aux=); scaling=attention_multiplier; layer_rope_theta per layer (0 = NoPE)"),
    Family("granitemoe_swa", "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", hybrid=True, moe=True,
           notes="as GraniteSWA"),
    Family("laguna", "LagunaConfig", "LagunaForCausalLM", hybrid=True, moe=True,
           notes="rope per layer type (partial on full); softplus output gate; heads per layer"),
    Family("mellum", "MellumConfig", "MellumForCausalLM", hybrid=True, moe=True, notes="rope per layer type"),
    Family("mimo_v2_flash", "MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", hybrid=True, moe=True,
           fields=dict(v_head_dim=8),
           notes="sinks on sliding layers only; V narrower than K (v_head_dim 8); KV heads doubled on sliding layers; "
           "partial rope per type; attention_value_scale"),
    Family("modernbert_decoder", "ModernBertDecoderConfig", "ModernBertDecoderForCausalLM", hybrid=True,
           fields=dict(bos_token_id=1, cls_token_id=1, sep_token_id=2), window_key="local_attention", window_scale=2,
           notes="window from local_attention (sliding_window = local_attention // 2); bos/cls/sep must be ints"),
    Family("gemma3n", "Gemma3nTextConfig", "Gemma3nForCausalLM", hybrid=True,
           fields=dict(num_kv_shared_layers=0, vocab_size_per_layer_input=97, hidden_size_per_layer_input=8,
                       laurel_rank=8, activation_sparsity_pattern=[0.0] * 4),
           notes="KV sharing off here (real checkpoints share: cache layers 'dummy'); AltUp, Laurel, per-layer inputs"),
    Family("gemma4", "Gemma4TextConfig", "Gemma4ForCausalLM", hybrid=True,
           fields=dict(vocab_size_per_layer_input=97, hidden_size_per_layer_input=8), kwargs=dict(global_head_dim=16),
           notes="last layer forced full; full layers: proportional partial rope and their own head_dim "
           "(global_head_dim, 512 by default)"),
    Family("gemma4_unified", "Gemma4UnifiedTextConfig", "Gemma4UnifiedForCausalLM", hybrid=True,
           kwargs=dict(global_head_dim=16), notes="as Gemma4"),
]

FAMILIES: dict[str, Family] = {family.name: family for family in _ALL}


def build(name: str, window: int, seed: int = 0) -> PreTrainedModel:
    """The family's tiny model, random weights from ``seed``: eval mode, fp32, Transformers' eager attention."""
    family = FAMILIES[name]
    torch.manual_seed(seed)
    model = family.model_class(family.make_config(window)).float().eval()
    model.set_attn_implementation("eager")
    return model


def pair(name: str, window: int, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The family's tiny model twice, the same weights: Transformers' eager attention (the reference) and
    rolling_xformers."""
    reference = build(name, window, seed)
    rolling = copy.deepcopy(reference)
    rolling.set_attn_implementation("rolling_xformers")
    return reference, rolling
