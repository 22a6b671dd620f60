import hashlib

from PIL import Image

from vlrl.tiny_model import ANSWER_WORDS, build_tiny_qwen3_vl


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_deterministic_for_a_seed_and_loadable_offline(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    a = build_tiny_qwen3_vl(tmp_path / "a", seed=3)
    b = build_tiny_qwen3_vl(tmp_path / "b", seed=3)
    c = build_tiny_qwen3_vl(tmp_path / "c", seed=4)
    assert digest(a) == digest(b) != digest(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (a / name).is_file(), name
    proc = AutoProcessor.from_pretrained(a)
    model = AutoModelForImageTextToText.from_pretrained(a)
    cfg = model.config
    assert cfg.text_config.head_dim >= 32  # vLLM's CPU attention refuses smaller heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == cfg.text_config.head_dim // 2
    tok = proc.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    for word in ANSWER_WORDS:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_chat_template_renders_qwen3_vl_instruct_structure(adapter):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "no"},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
    ]
    text = adapter.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "Same?<|im_end|>\n<|im_start|>assistant\nno<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    enc = adapter.encode_prompt(
        adapter.build_messages("Same?", 2), [Image.new("RGB", (64, 64)), Image.new("RGB", (64, 96))]
    )
    # 64x64 -> 2x2 merged tokens, 64x96 -> 2x3
    assert enc.input_ids.count(adapter.image_token_id) == 4 + 6
