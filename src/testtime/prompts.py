"""Prompt templates: named data, not strings assembled deep inside functions.

A template turns a question into chat messages (optionally after a few worked
examples given as earlier turns). The chat template of the model then turns the
messages into tokens; that step belongs to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry
from .spec import stable_hash


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user: str
    """The user turn; `{question}` is replaced by the problem's text."""
    system: str | None = None
    shots: tuple[tuple[str, str], ...] = ()
    """Worked examples, (question, answer) pairs, given as earlier chat turns."""
    assistant: str = ""
    """The start of the model's answer, written for it (`{question}` is replaced); the
    model continues from there and the sample holds only what the model wrote. Code
    templates open a Python code block this way."""
    stop: tuple[str, ...] = ()
    """Stop strings this format needs (a closing code fence); added to the run's own."""

    def messages(self, question: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in self.shots:
            msgs += [{"role": "user", "content": self.user.format(question=q)},
                     {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": self.user.format(question=question)})
        return msgs

    def continuation(self, question: str) -> str:
        return self.assistant.replace("{question}", question) if self.assistant else ""

    def identity(self) -> dict[str, str]:
        parts = [self.user, self.system, self.shots]
        if self.assistant or self.stop:  # keeps the ids of runs made before these fields existed
            parts += [self.assistant, list(self.stop)]
        return {"name": self.name, "sha": stable_hash(parts)}


TEMPLATES: Registry[PromptTemplate] = Registry("prompt template")


def register(t: PromptTemplate) -> PromptTemplate:
    return TEMPLATES.register(t.name)(t)


def get_template(name: str) -> PromptTemplate:
    return TEMPLATES.get(name)


MATH_COT = register(PromptTemplate(
    name="math_cot",
    system="You are a careful math tutor. Reason step by step, then state the final answer.",
    user="{question}\n\nSolve this step by step. End with the line \"The answer is N.\" where N is the final number.",
))

# Two worked examples in the exact answer format the verifier reads first.
# Small models copy the format of the examples far more reliably than they
# follow an instruction, and the format is what makes the answer extractable.
ARITHMETIC_FEWSHOT = register(PromptTemplate(
    name="arithmetic_fewshot",
    user="{question}",
    shots=(
        ("Mia has 4 pens. Mia buys 3 more pens. How many pens does Mia have now?",
         "Mia starts with 4 pens. She buys 3 more, so 4 + 3 = 7.\nThe answer is 7."),
        ("Leo has 12 cups. Leo gives away 5 cups. Leo then shares the cups equally among 7 people, "
         "keeping one share. How many cups does Leo have now?",
         "Leo starts with 12 cups. He gives away 5, so 12 - 5 = 7. "
         "He splits 7 cups among 7 people, so 7 / 7 = 1.\nThe answer is 1."),
    ),
))

PLAIN = register(PromptTemplate(name="plain", user="{question}"))

RESPONSE_MARKER = "Here is my response:"
"""Ends the thoughts and starts the response in the `thought` template (`testtime.tpo`)."""

# Thought Preference Optimization's format: private thoughts, then the response.
THOUGHT = register(PromptTemplate(
    name="thought",
    user=("{question}\n\nFirst think it through for yourself: what is asked, what matters, a plan or a draft. "
          f"Nobody will read these thoughts. Then write the line \"{RESPONSE_MARKER}\" and after it the answer for the "
          "user, which is all they will see."),
))


# The step-by-step format Meta published with its Llama 3 evaluations of MATH:
# short problems answered briefly, longer ones as "## Step k:" blocks, always
# closing with a boxed final answer. Written out here so that runs are
# comparable with results that used it (search-and-learn, the compute-optimal
# scaling papers).
LLAMA3_MATH = register(PromptTemplate(
    name="llama3_math",
    system=(
        "Solve the following math problem efficiently and clearly:\n\n"
        "- For simple problems (2 steps or fewer):\nProvide a concise solution with minimal explanation.\n\n"
        "- For complex problems (3 steps or more):\nUse this step-by-step format:\n\n"
        "## Step 1: [Concise description]\n[Brief explanation and calculations]\n\n"
        "## Step 2: [Concise description]\n[Brief explanation and calculations]\n\n...\n\n"
        "Regardless of the approach, always conclude with:\n\n"
        "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct.\n\n"
        "Where [answer] is just the final number or expression that solves the problem."
    ),
    user="{question}",
))

# Code: the model is shown the function (signature and docstring) and its answer
# is opened for it as a Python code block; the closing fence ends the sample.
# Small chat models write the whole function again far more readily than they
# continue a repeated docstring (given the docstring, SmolLM2 closes the block at
# once), so the candidate is usually a whole function; `verifiers.code` accepts
# a body as well.
CODE_COMPLETE = register(PromptTemplate(
    name="code_complete",
    user="Complete the following Python function.\n\n```python\n{question}```",
    assistant="```python\n",
    stop=("```",),
))

# MBPP-style: a task in words plus example asserts; the answer is whole code.
CODE_WRITE = register(PromptTemplate(
    name="code_write",
    system="You are an expert Python programmer. Answer with one Python code block and nothing else.",
    user="{question}",
    assistant="```python\n",
    stop=("```",),
))
