"""Build a tiny, randomly initialised Qwen3-VL that transformers and vLLM both load offline.

There is no model hub on the CI and development machines, so tests and the CPU demo use a model written
here: the real Qwen3-VL architecture (vision tower with deepstack, M-RoPE text model) at toy sizes, a
byte-level BPE tokenizer trained on a small built-in corpus, and a chat template with Qwen3-VL-Instruct's
structure. vLLM's CPU attention needs head_dim >= 32 and M-RoPE sections that sum to head_dim / 2.

The vocabulary is deliberately small (a few hundred tokens) and holds the answer words of the built-in tasks
as single tokens, so that a random policy hits a correct answer often enough for RL to learn from.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen3-VL-8B-Instruct's own chat template, verbatim (5292 bytes, SHA-256 3636d0f0bd6b...; the hub's
# `chat_template` of Qwen/Qwen3-VL-8B-Instruct): system prompt, tools (`<tools>` in the system turn), images
# and videos as `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands the pad), assistant tool
# calls as `<tool_call>` JSON, tool results as `<tool_response>` in a user turn. What the tests prove on the
# tiny model is then what the 8B model sees.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 - the template verbatim
CHAT_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"

# Qwen's tool and reasoning tags: single (added, not special) tokens, as in Qwen3-VL's tokenizer.
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
# `builtin:zoom`'s crop calls of the four quadrants of its 256 x 256 images (vlrl/envs/zoom.py), each one
# token of the tiny vocabulary: like the answer words below, so that a random policy calls the tool by chance
# often enough for RL to learn from. The text is Qwen3-VL's tool-call format to the character; the 8B
# tokenizer spells the same call in ~40 tokens.
# The template's fixed words around the tool schemas, one token each (the template writes them verbatim), and
# BPE merges learned from the built-in tools' schemas: a tool prompt stays ~280 tokens instead of ~800 for the
# tiny model on the CPU. `tests/test_tiny_model.py` checks both strings against the template's rendering.
TOOLS_BEFORE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
                "provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_AFTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
               "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
               "\"arguments\": <args-json-object>}\n</tool_call>")
ZOOM_CALLS = [
    '<tool_call>\n{"name": "crop", "arguments": {"x0": %d, "y0": %d, "x1": %d, "y1": %d}}\n</tool_call>'
    % (x, y, x + 128, y + 128)
    for y in (0, 128) for x in (0, 128)
]

# Words the built-in tasks ask about and answer with; each becomes one token (with and without a leading
# space) so the answer of a task is a single sampled token.
ANSWER_WORDS = [
    "red", "green", "blue", "yellow", "purple", "orange",
    "circle", "square", "triangle", "left", "right", "top", "bottom", "yes", "no",
]  # fmt: skip
# Other frequent words; they get merges too where the vocabulary has room, but need not be single tokens.
OTHER_WORDS = [
    "system", "user", "assistant", "What", "color", "is", "the", "shape", "image", "Answer", "with", "one",
    "word", "How", "many", "shapes", "Which", "side", "picture", "think", "answer",
]  # fmt: skip


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer: 256 byte symbols, merges learned from a built-in corpus, Qwen specials.

    Every answer word is one token, bare and after a space (checked here, so a change that breaks it fails
    at build time rather than as a demo that cannot learn).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    import json

    from .envs.calculator import CALCULATE
    from .envs.zoom import CROP

    # Answer words dominate the counts, so their merges come first and each ends as one token.
    schemas = " ".join(json.dumps(t.schema) for t in (CROP, CALCULATE))
    # (the frequent words before the schemas: a single-turn prompt keeps the length it had before tools
    # existed)
    corpus = [" " + " ".join(ANSWER_WORDS), "\n".join(ANSWER_WORDS)] * 100 + [" ".join(OTHER_WORDS)] * 100
    corpus += [schemas] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=20,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    # matched longest first: a zoom call is one token, not its tags
    tok.add_tokens(TAG_TOKENS + ZOOM_CALLS + [TOOLS_BEFORE, TOOLS_AFTER])
    for word in ANSWER_WORDS:
        for form in (word, " " + word):
            if len(tok.encode(form).ids) != 1:
                raise RuntimeError(f"tiny tokenizer: {form!r} is not a single token; raise vocab_size")
    return tok


# The tiny vision tower every tiny family shares: 16-pixel patches merged 2x2, output 128 wide.
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                   temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=256)


def build_tiny_qwen3_vl(out_dir: str | Path, seed: int = 0, vocab_size: int = 400, tied: bool = False,
                        vocab: str = "toy") -> Path:
    """Write a tiny random Qwen3-VL (config, safetensors, tokenizer, processor, chat template) to `out_dir`.

    Deterministic for a seed: the same seed writes the same weights and tokenizer. `tied`: the output head
    shares the input embedding, as Qwen3-VL-2B and 4B do (the default is untied, like the 8B and 32B).
    `vocab = "qwen"`: Qwen's real tokenizer and vocabulary size (`qwen_vocab.py`) instead of the toy one, for
    tests about tokens (tool calls of ~45 tokens, stop tokens that are text, 151,936 logits).
    """
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab == "qwen":
        from .qwen_vocab import VOCAB_SIZE, build_qwen_tokenizer

        raw, rows = build_qwen_tokenizer(), VOCAB_SIZE
    else:
        raw = build_tokenizer(vocab_size)
        rows = raw.get_vocab_size(with_added_tokens=True)
    ids = {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    head_dim = 32
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=rows,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            max_position_embeddings=4096,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=10000.0,
                mrope_section=[6, 5, 5],  # sums to head_dim / 2
                mrope_interleaved=True,
            ),
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tied,
        ),
        vision_config=dict(**TINY_VISION, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        # Untied by default like Qwen3-VL-8B; `tied` builds the 2B/4B layout (see rollout/weight_sync.py for
        # what that means for the disk weight sync).
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    return save_tiny(model, out, ids, tokenizer, CHAT_TEMPLATE)


def save_tiny(model, out: Path, ids: dict[str, int], tokenizer, chat_template: str) -> Path:
    """Every tiny family's checkpoint: generation defaults, safetensors weights, and a processor for small
    images (they keep the CPU fast: at most 16x16 merged tokens, 512x512 px; at least 2x2, 64x64 px)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    size = {"shortest_edge": 64 * 64, "longest_edge": 512 * 512}
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size)
    Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                     chat_template=chat_template).save_pretrained(out)
    return out
