"""
Prompt styles: what the user turn (and, for some styles, the system turn) says. The model's own chat template
(tokenizer.Tokenizer.render) turns these messages into tokens; nothing here knows about tokens.

    build_messages(example)                      -> [{"role": "user", "content": question + instruction}]
    build_messages(example, "boxed")             # any style, e.g. to ask a GSM8K question for a \\boxed{} answer
    build_messages(example, system="Be brief.")  # a system message of your own replaces the template's default

The style is a property of the example (data.load_dataset(..., style=...) stamps it into every example), so the
prompt and the grader always agree: data/graders.py reads `####` or the last \\boxed{} according to it.

Choices, each marked *paper*, *official* or *ours*:
1. GSM8K asks for the answer after "####" (*official*: the paper's code uses verl's GSM8K recipe, which appends this
   sentence to the question after one space, as the only (user) turn). The strict and official graders read it.
2. "qwen-boxed" is the MATH prompt as the paper ran it (*official*: SimpleRL's template of that name, which the
   paper's evaluation sweep passes, --template qwen-boxed): the system turn "You are a helpful assistant." and the
   user turn question + "\\nPlease reason step by step, and put your final answer within \\\\boxed{}.". It is the
   default of every MATH-style set. Its explicit system text matters: Qwen2.5-Instruct's own default system
   prompt is a longer sentence, and Qwen3's template has none.
3. "boxed" is the same user turn with the chat template's own default system prompt (*ours*), e.g. to ask a GSM8K
   question for a \\boxed{} answer.
4. Styles without a system text of their own (gsm8k, boxed, plain) send no system message (*official* for GSM8K):
   the chat template adds its default one (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ...").
   `system=` (eval.py --system-prompt) always wins: any string, even "", becomes the system message.
5. "plain" sends the bare question, for studying what a model does unprompted; its GSM8K strict score is ~0.
"""

BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
STYLES = {  # style -> the text appended to the question in the user turn
    "gsm8k": ' Let\'s think step by step and output the final answer after "####".',
    "boxed": BOXED_INSTRUCTION,
    "qwen-boxed": BOXED_INSTRUCTION,
    "plain": "",
}
SYSTEMS = {"qwen-boxed": "You are a helpful assistant."}  # style -> its own system turn (choice 2)
BOXED = frozenset({"boxed", "qwen-boxed"})  # styles whose prompt asks for \boxed{}: graders read the box


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}: expected one of {', '.join(STYLES)}")
    return style


def build_messages(example: dict, style: str | None = None, system: str | None = None) -> list[dict]:
    """The chat messages for one example, in `style` (default: the example's own style); `system` (a string)
    replaces the system turn, None keeps the style's own or the chat template's default (choice 4)."""
    style = check_style(style or example.get("style", "gsm8k"))
    system = SYSTEMS.get(style) if system is None else system
    user = {"role": "user", "content": example["question"].strip() + STYLES[style]}
    return ([{"role": "system", "content": system}] if system is not None else []) + [user]
