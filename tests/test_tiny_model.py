import hashlib

from PIL import Image

from vlrl.tiny_model import (
    ANSWER_WORDS,
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_SHA256,
    TAG_TOKENS,
    TOOLS_AFTER,
    TOOLS_BEFORE,
    ZOOM_CALLS,
    build_tiny_qwen3_vl,
)


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_deterministic_for_a_seed_and_loadable_offline(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    a = build_tiny_qwen3_vl(tmp_path / "a", seed=3)
    b = build_tiny_qwen3_vl(tmp_path / "b", seed=3)
    c = build_tiny_qwen3_vl(tmp_path / "c", seed=4)
    assert digest(a) == digest(b) != digest(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "processor_config.json"):
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
        {"role": "user",
         "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
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


def test_chat_template_is_qwen3_vl_8b_instructs_own(adapter):
    """Byte for byte Qwen3-VL-8B-Instruct's template, so tools, tool calls and tool results render as the 8B
    model sees them: tools in the system turn, a tool result (with its image) as a user turn."""
    assert hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest() == CHAT_TEMPLATE_SHA256
    assert adapter.processor.chat_template == CHAT_TEMPLATE == adapter.tokenizer.chat_template
    tool = {"type": "function",
            "function": {"name": "crop", "description": "Crop.", "parameters": {"type": "object"}}}
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant",
         "content": 'Let me look.\n<tool_call>\n{"name": "crop", "arguments": {}}\n</tool_call>'},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "the crop"}]},
    ]
    text = adapter.processor.apply_chat_template(msgs, tools=[tool], tokenize=False,
                                                 add_generation_prompt=True)
    assert TOOLS_BEFORE in text and TOOLS_AFTER in text  # the tiny tokenizer's two tool-instruction tokens
    assert text == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "crop", "description": "Crop.", "parameters": {"type": '
        '"object"}}}'
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n"
        '<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "crop", "arguments": '
        '{}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>the "
        "crop\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_tags_and_the_zoom_demos_crop_calls_are_single_tokens(adapter):
    tok = adapter.tokenizer
    for text in TAG_TOKENS + ZOOM_CALLS + [TOOLS_BEFORE, TOOLS_AFTER]:
        assert len(tok.encode(text, add_special_tokens=False)) == 1, text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    call = '<tool_call>\n{"name": "crop", "arguments": {"x0": 1, "y0": 0, "x1": 9, "y1": 9}}\n</tool_call>'
    ids = tok.encode(call, add_special_tokens=False)
    assert len(ids) > 3 and tok.decode(ids) == call  # any other call: the tags, then its text
