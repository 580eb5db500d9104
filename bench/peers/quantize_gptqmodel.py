"""Quantize with GPTQModel's GPTQ (its defaults: act_group_aware, damp 0.05) on given token ids, in float32.

Run with the gptqmodel venv's python (bench/peers/make_venvs.sh); bench/peers.py sets
GPTQMODEL_CPU_WORKERS and TORCH_COMPILE_DISABLE=1 (bench/peers/FORMATS.md, gotchas).
"""

from peer_run import calibration_ids, run


def quantize(a) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    # float32 like quantkit on CPU; GPTQModel would otherwise load (and save) bfloat16.
    model = GPTQModel.load(a.model, QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=a.sym),
                           device="cpu", dtype=torch.float32)
    samples = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration_ids(a.tokens)]
    model.quantize(samples, batch_size=1)
    model.save(a.out)


if __name__ == "__main__":
    run(quantize, __doc__, ("gptq",))
