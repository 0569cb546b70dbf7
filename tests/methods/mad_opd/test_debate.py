"""The blind debate's plumbing: what each teacher is asked per round, the confidence it yields (tags,
fallback), the scoring context (the transcript, never the student's answer; scored without grad) and
the alignment rule when a context does not fit a teacher's window."""

from __future__ import annotations

import pytest
import torch

from lit_opd import HFTeacher
from lit_opd.methods.mad_opd import DebatePrompts, DebateSettings, MADOPDModule, run_debate
from lit_opd.methods.mad_opd.debate import answer_confidence, forced_batch
from lit_opd.objectives import divergences as D
from tests.helpers import make_rollout_batch, make_tiny_model

PROMPTS, COMPLETIONS = ("12+3=", "4+56=", "12+3="), ("777", "7", "77")  # no 7 anywhere else


class ScriptedTeacher(HFTeacher):
    """A tiny real model that scores for real, but whose debate answers are scripted: ``answers[r]``
    per round (a callable of the prompt), recording every call and every scored batch."""

    def __init__(self, tok, seed: int, answers, **kwargs) -> None:  # noqa: ANN001, ANN003
        super().__init__(make_tiny_model(len(tok), 32, 2, seed=seed), tokenizer=tok, **kwargs)
        self.answers, self.calls, self.scored, self.grad = answers, [], [], []

    def generate_text(  # noqa: ANN201
        self, prompts, max_new_tokens, num_samples=1, temperature=1.0, seed=0,  # noqa: ANN001
    ):
        self.calls.append({"prompts": list(prompts), "seed": seed, "temperature": temperature})
        script = self.answers[len(self.calls) - 1]
        return [[script(p)] for p in prompts]

    def score(self, batch):  # noqa: ANN001, ANN201
        self.grad.append(torch.is_grad_enabled())
        self.scored.append(batch)
        return super().score(batch)


def _pair(tok, tags=(("80", "60"), ("80", "60"))):  # noqa: ANN001, ANN202
    last_a = f"alpha two <<CONFIDENCE=1>> <<CONFIDENCE={tags[0][0]}>>"  # two tags: the last one counts
    a = ScriptedTeacher(tok, 1, [lambda p: "alpha one <<CONFIDENCE=10>>", lambda p: last_a], name="a")
    b = ScriptedTeacher(tok, 2, [lambda p: "beta one", lambda p: f"beta two <<CONFIDENCE={tags[1][1]}>>"],
                        name="b")
    return a, b


def test_each_round_is_one_call_per_teacher_over_all_prompts_and_round_two_reads_the_transcript(char_tok):
    a, b = _pair(char_tok)
    result = run_debate([a, b], ["12+3=", "4+56="], DebateSettings(rounds=2), seed=5)
    assert [len(t.calls) for t in (a, b)] == [2, 2] and all(len(c["prompts"]) == 2 for c in a.calls + b.calls)
    first = a.calls[0]["prompts"][0]
    assert "12+3=" in first and "<<CONFIDENCE=N>>" in first and "[Debate Start]" not in first
    second_a, second_b = a.calls[1]["prompts"][1], b.calls[1]["prompts"][1]
    for text in (second_a, second_b):  # the whole round-1 transcript, both experts
        assert "4+56=" in text and "[Expert A Round 1]: alpha one" in text
        assert "[Expert B Round 1]: beta one" in text
    assert "You are Expert A" in second_a and "You are Expert B" in second_b
    assert len({c["seed"] for c in a.calls + b.calls}) == 4 and a.calls[0]["temperature"] == 0.7
    transcript = result.transcripts[0]
    assert transcript.startswith("[Debate Start]") and transcript.endswith("[Debate End]")
    assert "[Expert B Round 2]: beta two" in result.transcripts[0]
    assert result.confidence_NK.tolist() == [[80.0, 60.0], [80.0, 60.0]]  # the last round's last tags


def test_the_scoring_context_holds_the_transcript_and_never_the_students_answer(char_tok):
    a, b = _pair(char_tok)
    module = MADOPDModule(make_tiny_model(len(char_tok), 32, 2, seed=0), {"a": a, "b": b}, tokenizer=char_tok,
                          mode="debate", debate=DebateSettings(rounds=2, max_length=1024))
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS, rows=[{"prompt": p} for p in PROMPTS])
    loss, metrics = module.mad_loss(batch)
    # one debate per distinct prompt: rows 0 and 2 share "12+3="
    assert [len(c["prompts"]) for c in a.calls] == [2, 2] and metrics["debate/prompts"] == 2.0
    for call in a.calls + b.calls:
        assert not any("7" in p for p in call["prompts"])  # blind: the completions are all 7s
    for k, teacher in enumerate((a, b)):
        assert teacher.grad == [False]
        forced = teacher.scored[0]
        contexts = [char_tok.decode(ids[m.bool()].tolist())
                    for ids, m in zip(forced.prompt_ids_BP, forced.prompt_mask_BP)]
        for context, prompt in zip(contexts, PROMPTS):
            assert context.startswith(prompt) and "[Expert A Round 2]: alpha two" in context
            assert f"You are Expert {'AB'[k]}" in context and "7" not in context
        torch.testing.assert_close(forced.completion_ids_BT, batch.completion_ids_BT)  # the exact tokens
    assert metrics["weight/a"].item() == pytest.approx(0.549834, abs=1e-6)
    assert metrics["missing_tag_frac"].item() == 0.0 and loss.requires_grad


def test_a_missing_tag_gives_uniform_weights_or_the_likelihood_fallback(char_tok):
    rows = [{"prompt": p} for p in PROMPTS[:2]]
    batch = make_rollout_batch(char_tok, PROMPTS[:2], COMPLETIONS[:2], rows=rows)
    a, b = _pair(char_tok, tags=(("80", "60"), ("80", "none")))
    module = MADOPDModule(make_tiny_model(len(char_tok), 32, 2, seed=0), {"a": a, "b": b}, tokenizer=char_tok)
    _, metrics = module.mad_loss(batch)
    assert metrics["missing_tag_frac"].item() == 1.0 and metrics["weight/a"].item() == pytest.approx(0.5)

    a, b = _pair(char_tok, tags=(("80", "60"), ("80", "none")))
    module = MADOPDModule(make_tiny_model(len(char_tok), 32, 2, seed=0), {"a": a, "b": b}, tokenizer=char_tok,
                          debate=DebateSettings(confidence="tag_or_logprob"))
    _, metrics = module.mad_loss(batch)
    # both teachers of the row use their own answer's likelihood (one scale), not A's tag of 80
    c_a = answer_confidence(a, char_tok, [a.calls[1]["prompts"][0]],
                            ["alpha two <<CONFIDENCE=1>> <<CONFIDENCE=80>>"], "cpu")
    c_b = answer_confidence(b, char_tok, [b.calls[1]["prompts"][0]], ["beta two <<CONFIDENCE=none>>"], "cpu")
    expected = torch.softmax(torch.cat([c_a, c_b]) / 100.0, 0)[0]
    assert metrics["weight/a"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_the_fallback_confidence_is_the_teachers_own_answer_likelihood(char_tok):
    teacher = HFTeacher(make_tiny_model(len(char_tok), 32, 2, seed=3), tokenizer=char_tok)
    conf = answer_confidence(teacher, char_tok, ["12+3=", "4+5="], ["51", ""], "cpu")
    ids = char_tok("12+3=")["input_ids"] + char_tok("51", add_special_tokens=False)["input_ids"]
    logits = teacher.model(torch.tensor([ids])).logits[0, :-1]
    logp = D.token_logprobs(logits[None], torch.tensor([ids[1:]]))[0, -2:]
    assert conf[0].item() == pytest.approx(100 * logp.mean().exp().item(), rel=1e-5)
    assert conf[1].isnan()  # an empty answer has no likelihood: the row falls back to uniform


def test_a_context_that_does_not_fit_is_cut_from_its_start_and_the_rest_is_not_covered(char_tok):
    """Alignment: the completion of 5 tokens after a 10-token context, window 8 → the context keeps
    its last 3 tokens and all 5 positions are covered; window 4 → 1 context token, T_A = 3."""
    batch = make_rollout_batch(char_tok, ("1+1=", "2+2="), ("1234", "5"))  # 5 and 2 tokens with EOS
    context = list(range(20, 30))
    forced, covered_B, cut_B = forced_batch(batch, [context, context], char_tok.pad_token_id, max_length=8)
    assert covered_B.tolist() == [5, 2] and cut_B.tolist() == [True, True]
    assert forced.prompt_ids_BP[0][forced.prompt_mask_BP[0].bool()].tolist() == [27, 28, 29]
    assert forced.prompt_ids_BP[1][forced.prompt_mask_BP[1].bool()].tolist() == context[-6:]
    forced, covered_B, _ = forced_batch(batch, [context, context], char_tok.pad_token_id, max_length=4)
    assert covered_B.tolist() == [3, 2] and forced.prompt_mask_BP.sum(-1).tolist() == [1, 2]
    assert forced.completion_mask_BT[0].tolist() == [True, True, True, False, False]
    torch.testing.assert_close(forced.completion_ids_BT[0, :3], batch.completion_ids_BT[0, :3])
    forced, covered_B, cut_B = forced_batch(batch, [context, context], char_tok.pad_token_id, max_length=None)
    assert covered_B.tolist() == [5, 2] and not cut_B.any()
    assert forced.prompt_mask_BP.sum(-1).tolist() == [10, 10]


@pytest.mark.parametrize("settings, message", [
    (dict(first_round="Answer:{confidence}"), r"first_round must contain \['\{prompt\}'\]"),
    (dict(next_round="{prompt} {transcript}"), r"next_round must contain"),
    (dict(force_decode="{expert} says"), r"force_decode must contain \{transcript\}"),
    (dict(entry="{expert} {name}"), r"may use only"),
])
def test_bad_debate_texts_name_the_template(settings, message):
    with pytest.raises(ValueError, match=message):
        DebatePrompts(**settings)


@pytest.mark.parametrize("settings, message", [
    (dict(rounds=0), r"debate.rounds=0 must be an integer >= 1"), (dict(temperature=0), "debate.temperature"),
    (dict(confidence="vote"), "debate.confidence='vote'"), (dict(max_length=1), "debate.max_length=1"),
])
def test_bad_debate_settings_name_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        DebateSettings(**settings)


def test_the_debate_renders_its_prompts_with_the_datamodules_template_variables():
    from lit_opd.rollout.prompts import PromptTokenizer
    from lit_opd.tasks import char_tokenizer

    tok = char_tokenizer(chat_template=True)
    tok.chat_template = "{% if brief %}b{% endif %}{{ messages[0]['content'] }}"
    a, b = _pair(tok)
    module = MADOPDModule(make_tiny_model(len(tok), 32, 2, seed=0), {"a": a, "b": b}, tokenizer=tok)
    assert module._render("1+1=") == "1+1="
    module.connect_prompts(PromptTokenizer(tok, 64, "error", True, None, chat_template_kwargs={"brief": True}),
                           [], [])
    assert module._render("1+1=") == "b1+1=" and tok.decode(module._context_ids("1+1=")) == "b1+1="
