"""Run under `torchrun --nproc_per_node=2` by tests/test_scale.py (gloo backend, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py MODE CHECKPOINT OUT

MODE is
  awr      one AWR optimizer step with DDP over the global batch of tests/test_scale.awr_batch()
  fsdp     the same step with FSDP (fully_shard) instead of DDP
  rollout  rise.rollout_all over tests/test_scale.rollout_problems(), each rank on its shard
Rank 0 writes the result to OUT (weights as safetensors and the step's stats beside them as .json,
episodes as JSON lines).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import rise  # noqa: E402
from tests import test_scale  # noqa: E402


def main():
    mode, checkpoint, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    device = rise.init_distributed()
    assert rise.world_size() == 2, "run me under torchrun --nproc_per_node=2"
    policy = test_scale.load_toy_policy(checkpoint)
    if mode in ("awr", "fsdp"):
        cfg = test_scale.awr_config(fsdp=mode == "fsdp", device=device)
        stats = rise.train(policy.model, test_scale.awr_batch(policy), cfg, policy.tokenizer.pad_id, shuffle_seed=0)
        state = None
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
        if rise.is_main():
            from safetensors.torch import save_file
            state = state if state is not None else policy.model.state_dict()
            save_file({k: v.detach().contiguous() for k, v in state.items()}, out)
            out.with_suffix(".json").write_text(json.dumps(stats))
    elif mode == "rollout":
        episodes = rise.rollout_all(policy, test_scale.rollout_problems(), test_scale.rollout_config(), [2, 2],
                                    "oracle", sampling_seed=7)
        if rise.is_main():
            out.write_text(data.episodes_to_jsonl(episodes))
    else:
        raise SystemExit(f"unknown mode {mode}")
    rise.barrier()
    torch.distributed.destroy_process_group()
    # gloo's background threads can abort the process while the interpreter tears down ("terminate called
    # without an active exception"): the work is done and written, so leave without that teardown
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
