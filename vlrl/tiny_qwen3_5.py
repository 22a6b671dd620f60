"""Build a tiny, randomly initialised Qwen3.5 that transformers and vLLM both load offline.

Qwen3.5 is natively multimodal and hybrid: three of every four decoder layers are Gated DeltaNet (linear
attention with a causal conv1d and a recurrent state), the fourth is gated full attention with partial M-RoPE
(a quarter of each head rotated). The tiny model keeps that structure at toy sizes: 4 layers (3 Gated
DeltaNet, then 1 full attention), the vision tower (no deepstack in Qwen3.5), and Qwen3.5's own chat template.
vLLM's CPU attention needs head_dim >= 32: the attention heads are 64 wide, a quarter rotated (16 dims, M-RoPE
sections [3, 3, 2] summing to 8). vLLM's CPU Gated DeltaNet kernel refuses head dims of 32 ("Unexpected head
dim size, 32"): the linear heads are 128 wide, as in every Qwen3.5 size.

The vocabulary is the toy one of `tiny_model.py` (a few hundred tokens; answer words single tokens), so the
CPU demo's tasks stay learnable. Qwen3.5's real tokenizer (248,320 rows, a new BPE) is not available offline:
no wheel on the machines carries it, so token-level tests of Qwen3.5 with its real vocabulary are not possible
here.
"""

from __future__ import annotations

from pathlib import Path

from .tiny_model import SPECIAL_TOKENS, TINY_VISION, build_tokenizer, save_tiny

# Qwen3.5's own chat template, verbatim: the `chat_template` of the hub's Qwen/Qwen3.5-4B
# (https://huggingface.co/Qwen/Qwen3.5-4B), 7756 bytes, SHA-256 a4aee8afcf2e...; transcribed from a public
# copy that names that repository as its source; a llama.cpp server's /props fixture in another public
# repository (Qwen3.5-122B-A10B) serves the same template but for one spelling of its tool-argument loop.
# What differs from Qwen3-VL's: a thinking generation prompt (`<|im_start|>assistant\n<think>\n`;
# `enable_thinking=False` writes an empty `<think>\n\n</think>\n\n`), the last turn's assistant replies
# rendered with their `<think>` block, tool calls as XML (`<tool_call>\n<function=NAME>\n<parameter=...`), and
# a chat must hold a user turn (`No user query found in messages.`).
CHAT_TEMPLATE = r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 - the template verbatim
CHAT_TEMPLATE_SHA256 = "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"

LAYER_TYPES = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]


def build_tiny_qwen3_5(out_dir: str | Path, seed: int = 0, vocab_size: int = 400, tied: bool = False,
                       vocab: str = "toy") -> Path:
    """Write a tiny random Qwen3.5 (config, safetensors, tokenizer, processor, chat template) to `out_dir`.

    Deterministic for a seed. `tied`: the output head shares the input embedding (Qwen3.5-0.8B/2B/4B do; 9B
    and 27B do not). `vocab`: only "toy" (Qwen3.5's real tokenizer is not available offline)."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
    )

    from .errors import UserError

    if vocab != "toy":
        raise UserError(f"--vocab {vocab!r}: the tiny Qwen3.5 has the toy vocabulary only (Qwen3.5's real "
                        "tokenizer is not available offline)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    config = Qwen3_5Config(
        text_config=dict(
            vocab_size=rows,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=len(LAYER_TYPES),
            layer_types=LAYER_TYPES,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            linear_conv_kernel_dim=4,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_num_key_heads=1,
            linear_num_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=10000.0,
                partial_rotary_factor=0.25,
                mrope_section=[3, 3, 2],  # sums to head_dim * partial_rotary_factor / 2
                mrope_interleaved=True,
            ),
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tied,
        ),
        vision_config=dict(TINY_VISION),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).to(torch.float32).eval()
    return save_tiny(model, out, ids, tokenizer, CHAT_TEMPLATE)
