"""peft generate: streams from a base model, a run (base + adapter) and a merged model."""

import pytest

from conftest import no_traceback
from peftcli.data import ALPACA_PROMPT_WITH_INPUT
from peftcli.errors import UserError
from peftcli.generate import ChatSession, chat_prompt, generate, load_for_inference, load_with_adapters

# A prompt like the tiny run's training data, which its adapter has learnt to answer (badly).
PROMPT = ALPACA_PROMPT_WITH_INPUT.format(instruction="Extract the contact as JSON.",
                                         input="At 26, Tariq Costa opened a small shop in Malmo.")


@pytest.fixture(scope="module")
def merged_dir(trained_run, tmp_path_factory):
    from peftcli.merge import run_merge

    _, output = run_merge(trained_run[2].root, output=tmp_path_factory.mktemp("g") / "merged")
    return output


def test_generation_streams_piece_by_piece(trained_run):
    loaded = load_for_inference(str(trained_run[2].root))
    pieces = []
    text = generate(loaded, PROMPT, max_new_tokens=24, temperature=0, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text and text.strip()
    assert "lora adapter" in loaded.description and "builtin:tiny-gpt2" in loaded.description


def test_a_run_and_its_merged_model_generate_the_same_greedy_text(peft, trained_run, merged_dir):
    outputs = []
    for target in (trained_run[2].root, merged_dir):
        result = peft("generate", target, "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 24)
        assert result.code == 0, result
        outputs.append(result.output.split("\n", 1)[1])  # the first line says what was loaded
    assert outputs[0] == outputs[1] and outputs[0].strip()
    base = peft("generate", "builtin:tiny-gpt2", "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 24)
    assert base.code == 0 and base.output.split("\n", 1)[1] != outputs[0]  # the adapter changed what it says


def test_sampling_and_chat(peft, trained_run):
    result = peft("generate", trained_run[2].root, "--prompt", "hi", "--chat", "--temperature", 1.0,
                  "--max-new-tokens", 8)
    assert result.code == 0, result
    loaded = load_for_inference(str(trained_run[2].root))
    rendered = chat_prompt(loaded.tokenizer, "hi")
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # ChatML, as training renders chat


def test_bad_targets_are_clear_errors(peft, tmp_path):
    missing = peft("generate", tmp_path / "nothing", "--prompt", "x")
    assert missing.code == 2 and str(tmp_path / "nothing") in missing.output
    extra = peft("generate", "builtin:tiny-gpt2", "--prompt", "x", "--base", "builtin:tiny-llama")
    assert extra.code == 2 and "--base goes with an adapter" in extra.output
    no_prompt = peft("generate", "builtin:tiny-gpt2")
    assert no_prompt.code == 2 and "--prompt" in no_prompt.output
    assert no_traceback(missing.output + extra.output)


# ---------------------------------------------------------------------------------------
# Several adapters on one base


def logits_in_use(loaded, text="Count from two: two three"):
    from peftcli.merge import logits

    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with loaded.switched():
        return logits(loaded.model, [ids])[0]


@pytest.fixture(scope="module")
def both(task_runs):
    return load_with_adapters("builtin:tiny-gpt2", {name: str(run) for name, run in task_runs.items()})


def test_adapters_swap_on_one_base_exactly_as_each_loaded_alone(both, task_runs):
    import torch

    assert both.active == "contacts" and list(both.adapters) == ["contacts", "count"]
    swapped = {}
    for name in ("count", "base", "contacts"):
        both.use(name)
        swapped[name] = logits_in_use(both)
    alone = {name: logits_in_use(load_for_inference(str(run))) for name, run in task_runs.items()}
    alone["base"] = logits_in_use(load_for_inference("builtin:tiny-gpt2"))
    for name, expected in alone.items():
        assert torch.allclose(swapped[name], expected, atol=1e-5), name
    # The two tasks taught different things, and both moved the base.
    assert (swapped["contacts"] - swapped["count"]).abs().max() > 0.1
    assert min((swapped[n] - swapped["base"]).abs().max() for n in ("contacts", "count")) > 0.1


def test_an_unknown_adapter_name_lists_the_choices(both):
    with pytest.raises(UserError, match="no adapter named 'nope'") as err:
        both.use("nope")
    assert "contacts, count, base" in str(err.value)


def test_generate_with_named_adapters_matches_each_run_alone(peft, task_runs):
    prompt, options = "Count from two:", ("--temperature", 0, "--max-new-tokens", 12)
    adapters = [f"--adapter={name}={run}" for name, run in task_runs.items()]

    def completion(*args):
        result = peft("generate", *args, "--prompt", prompt, *options)
        assert result.code == 0, result
        return result.output.split("\n", 1)[1]  # the first line says what was loaded

    for name, run in task_runs.items():
        assert completion("builtin:tiny-gpt2", *adapters, "--use", name) == completion(run)
    assert completion("builtin:tiny-gpt2", *adapters, "--use", "base") == completion("builtin:tiny-gpt2")
    assert completion(task_runs["count"], "--use", "base") == completion("builtin:tiny-gpt2")


@pytest.mark.parametrize("args,message", [
    (["--adapter", "x"], "--adapter takes NAME=DIR"),
    (["--adapter", "a=RUN", "--adapter", "a=RUN"], "two adapters are named 'a'"),
    (["--adapter", "base=RUN"], "'base' is reserved"),
    (["--adapter", "a.b=RUN"], "letters, digits, _ and -"),
    (["--adapter", "a=RUN", "--use", "b"], "no adapter named 'b'"),
    (["--adapter", "a=RUN", "--base", "builtin:tiny-gpt2"], "--base goes with a single run"),
])
def test_adapter_options_mistakes_are_clear(peft, task_runs, args, message):
    args = [a.replace("RUN", str(task_runs["count"])) for a in args]
    result = peft("generate", "builtin:tiny-gpt2", *args, "--prompt", "x")
    assert result.code == 2 and message in result.output and no_traceback(result.output), result


def test_an_adapter_as_the_base_is_refused(peft, task_runs):
    result = peft("generate", task_runs["count"], "--adapter", f"c={task_runs['contacts']}", "--prompt", "x")
    assert result.code == 2 and "the first argument is the base model" in result.output, result


# ---------------------------------------------------------------------------------------
# peft chat


def chat(task_runs, lines: list[str], *extra):
    from typer.testing import CliRunner

    from peftcli.cli import app

    args = ["chat", "builtin:tiny-gpt2", *[f"--adapter={n}={r}" for n, r in task_runs.items()],
            "--temperature", "0", "--max-new-tokens", "10", *extra]
    result = CliRunner().invoke(app, args, input="".join(line + "\n" for line in lines))
    return result.exit_code, result.output


def test_chat_switches_lists_and_answers_as_generate_does(peft, task_runs):
    code, output = chat(task_runs, ["/adapters", "Count from two:", "/use nope", "/use count", "/adapters",
                                    "/reset", "Count from two:", "/exit", "never read"])
    assert code == 0 and no_traceback(output), output
    listing = "* contacts  lora  {}\n  count  lora  {}\n  base  (no adapter)"
    assert listing.format(task_runs["contacts"] / "adapter", task_runs["count"] / "adapter") in output
    assert "error: no adapter named 'nope'" in output and "using count" in output
    assert "  contacts  lora" in output.split("using count", 1)[1]  # the second listing moved the star
    for name in ("contacts", "count"):  # each fresh conversation's answer is generate --chat's
        expected = peft("generate", task_runs[name], "--chat", "--prompt", "Count from two:", "--temperature", 0,
                        "--max-new-tokens", 10)
        answer = expected.output.split("\n", 1)[1]  # the completion, then a new line
        assert answer.strip() and f"{name}> {answer}" in output, (answer, output)
    assert "never read" not in output and "you> " not in output


def test_chat_ends_at_the_end_of_input_and_starts_on_use(task_runs):
    code, output = chat(task_runs, ["/use", "/bogus", "hello"], "--use", "base")
    assert code == 0 and "using base" in output and "base> " in output
    assert "error: unknown command '/bogus'" in output and "error: unknown command '/use'" in output


def test_the_conversation_is_kept_and_trimmed_to_the_context(both):
    session = ChatSession(both, max_new_tokens=4, temperature=0)
    first = session.reply("Count from two:", lambda _: None)
    session.reply("And from five?", lambda _: None)
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first
    session.history.append({"role": "user", "content": "again"})
    assert session.fitted_history() == session.history  # it all fits in 1,024 positions
    session.max_new_tokens = 1024 - session._length(session.history[-3:]) + 1  # room for the last 3 turns only
    assert session.fitted_history() == session.history[-1:]  # whole exchanges go; the newest message stays
    session.max_new_tokens = 1024 - session._length(session.history[-3:])
    assert session.fitted_history() == session.history[-3:]


def test_adapters_of_different_methods_share_a_base_through_peft_mixed_model(tmp_path):
    import torch
    from peft import IA3Config, LoHaConfig, LoraConfig

    from conftest import save_adapter

    made = {"lora": save_adapter(tmp_path / "lora", "builtin:tiny-llama", LoraConfig(r=4, target_modules=["q_proj"])),
            "loha": save_adapter(tmp_path / "loha", "builtin:tiny-llama", LoHaConfig(r=4, target_modules=["v_proj"]))}
    both = load_with_adapters("builtin:tiny-llama", {name: str(path) for name, path in made.items()})
    assert type(both.model).__name__ == "PeftMixedModel"
    for name, path in made.items():
        both.use(name)
        assert torch.allclose(logits_in_use(both), logits_in_use(load_for_inference(str(path))), atol=1e-5)
    both.use("base")
    assert torch.allclose(logits_in_use(both), logits_in_use(load_for_inference("builtin:tiny-llama")), atol=1e-6)
    ia3 = save_adapter(tmp_path / "ia3", "builtin:tiny-llama", IA3Config(target_modules=["q_proj"],
                                                                         feedforward_modules=[]))
    with pytest.raises(UserError, match="adapter 'b' is ia3, and adapters of different methods share one base only"):
        load_with_adapters("builtin:tiny-llama", {"a": str(made["lora"]), "b": str(ia3)})
