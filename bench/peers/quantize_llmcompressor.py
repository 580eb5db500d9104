"""Quantize with llm-compressor's GPTQModifier (its defaults: static act-order, damp 0.01), alone or after
AWQ, SpinQuant (R1+R2, random Hadamard) or QuIP (online input rotations), on given token ids, in float32;
writes compressed-tensors pack-quantized.

Run with the llmcompressor venv's python (bench/peers/make_venvs.sh).
"""

from peer_run import calibration_ids, run

METHODS = ("gptq", "awq", "spinquant", "quip")


def recipe(a) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import AWQModifier, QuIPModifier, SpinQuantModifier

    weights = {"num_bits": a.bits, "type": "int", "symmetric": a.sym, "strategy": "group", "group_size": a.group_size}
    gptq = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    # SpinQuant's default "hadamard" needs powers of two (SmolLM2's hidden size is 576); QuIP's default is random.
    before = {"gptq": [], "awq": [AWQModifier()], "spinquant": [SpinQuantModifier(transform_type="random-hadamard")],
              "quip": [QuIPModifier()]}[a.method]
    return [*before, gptq]


def quantize(a) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = calibration_ids(a.tokens)
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(ids[0])] * len(ids)})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    oneshot(model=model, dataset=data, recipe=recipe(a), num_calibration_samples=len(ids),
            max_seq_length=len(ids[0]), shuffle_calibration_samples=False)
    model.save_pretrained(a.out, save_compressed=True)
    AutoTokenizer.from_pretrained(a.model).save_pretrained(a.out)


if __name__ == "__main__":
    run(quantize, __doc__, METHODS)
