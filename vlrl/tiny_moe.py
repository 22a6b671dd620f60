"""Build a tiny, randomly initialised mixture-of-experts Qwen3-VL (`qwen3_vl_moe`) that transformers and vLLM
both load offline.

It is the tiny dense model of `tiny_model.py` (same tokenizer, processor, chat template, vision tower sizes,
attention sizes and M-RoPE sections) with every decoder layer's MLP replaced by a sparse MoE block: 4 experts,
top-2, as Qwen3-VL-30B-A3B's layers are (128 experts, top-8, no shared expert, router probabilities
renormalised over the chosen experts). Few experts and top-2 keep routing decisions frequent enough to matter
(every token's pair of experts is one of 6) while the model stays as fast as the dense one on the CPU.
"""

from __future__ import annotations

from pathlib import Path

NUM_EXPERTS = 4
TOP_K = 2


def build_tiny_qwen3_vl_moe(out_dir: str | Path, seed: int = 0, vocab_size: int = 400, tied: bool = False,
                            vocab: str = "toy", num_experts: int = NUM_EXPERTS, top_k: int = TOP_K) -> Path:
    """Write a tiny random Qwen3-VL-MoE (config, safetensors, tokenizer, processor) to `out_dir`.

    Deterministic for a seed. The arguments are `build_tiny_qwen3_vl`'s, plus the expert count and top-k."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from .tiny_model import build_tiny_qwen3_vl

    out = build_tiny_qwen3_vl(out_dir, seed=seed, vocab_size=vocab_size, tied=tied, vocab=vocab)
    dense = Qwen3VLConfig.from_pretrained(out)
    text = dense.text_config.to_dict()
    for key in ("model_type", "intermediate_size", "architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    config = Qwen3VLMoeConfig(
        text_config=dict(
            text,
            intermediate_size=256,  # (dense MLPs: none, every layer is sparse)
            # 2 x 32 != 128: the experts' in-memory and checkpoint layouts differ in shape, as every real
            # size's do (transformers tells them apart by shape on load: checkpoint_layout.py)
            moe_intermediate_size=32,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=0.001,
            # vLLM reads it (renormalised top-k weights, as transformers' router always does); the
            # Qwen3-VL-30B-A3B config.json holds it too
            norm_topk_prob=True,
        ),
        vision_config={k: v for k, v in dense.vision_config.to_dict().items()
                       if k not in ("model_type", "architectures", "transformers_version", "dtype")},
        image_token_id=dense.image_token_id,
        video_token_id=dense.video_token_id,
        vision_start_token_id=dense.vision_start_token_id,
        vision_end_token_id=dense.vision_end_token_id,
        tie_word_embeddings=tied,
    )
    for f in out.glob("*.safetensors*"):
        f.unlink()
    (out / "config.json").unlink()
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(config).to(torch.float32).eval()
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(out)
    from .adapters.checkpoint_layout import checkpoint_state

    model.save_pretrained(out, state_dict=checkpoint_state(model, dict(model.state_dict())),
                          safe_serialization=True, save_original_format=False)
    return out
