"""
Prompt styles: what the user turn says. The model's own chat template (model.Tokenizer.apply_chat_template)
turns these messages into tokens; nothing here knows about tokens.

    build_messages(example)            -> [{"role": "user", "content": question + " " + instruction}]
    build_messages(example, "boxed")   # any style, e.g. to ask a GSM8K question for a \\boxed{} answer

Choices, each marked *paper* or *ours*:
1. GSM8K asks for the answer after "####" (*paper*: its training code used verl's GSM8K recipe, which appends this
   sentence to the question after one space). The strict grader reads exactly that marker.
2. MATH-style sets ask for \\boxed{} (*paper*, after SimpleRL / Qwen2.5-Math: the sentence on a new line after the
   problem, in the user turn).
3. No system prompt of our own (*ours*): the chat template adds its default one (Qwen: "You are a helpful
   assistant."), so a prompt reads as the model's instruct format intends.
4. "plain" sends the bare question, for studying what a model does unprompted; its GSM8K strict score is ~0.
"""

STYLES = {
    "gsm8k": ' Let\'s think step by step and output the final answer after "####".',
    "boxed": "\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "plain": "",
}


def build_messages(example: dict, style: str | None = None) -> list[dict]:
    """The chat messages for one example, in `style` (default: the example's own style)."""
    style = style or example.get("style", "gsm8k")
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}: expected one of {', '.join(STYLES)}")
    return [{"role": "user", "content": example["question"].strip() + STYLES[style]}]
