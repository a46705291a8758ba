"""peft generate: streams from a base model, a run (base + adapter) and a merged model."""

import pytest

from conftest import no_traceback
from peftcli.data import ALPACA_PROMPT_WITH_INPUT
from peftcli.generate import chat_prompt, generate, load_for_inference

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
