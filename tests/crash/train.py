"""Train with checkpoints (resumable); save the final weights. Used by the kill-and-resume test.

usage: train.py CKPT_DIR OUT_FILE EPOCHS [--resume] [--slow]
"""

import sys
import time

import torch

import modaldiag as md


class Slow(md.Callback):
    """Stretch each step a little so a kill lands mid-epoch at a random moment."""

    def on_train_batch_end(self, ctx):
        time.sleep(0.02)


def main() -> None:
    ckpt, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = md.datasets.synthetic(n_samples=600, num_classes=3, strength={"a": 2.0, "b": 0.6},
                                 dims={"a": 8, "b": 8}, seed=0)
    torch.manual_seed(0)
    model = md.models.default_model(data, feature_dim=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    regulators = [md.ValuationResampling(warmup=1), md.OGM(noise=True), md.InfoReg()]
    md.fit(model, data.train.loader(32, shuffle=True), data.val.loader(128), epochs=epochs,
           optimizer=optimizer, scheduler=scheduler, regulator=regulators,
           callbacks=[Slow()] if "--slow" in sys.argv else [], checkpoint_dir=ckpt,
           resume="--resume" in sys.argv, restore_best=False, progress=False, seed=7)
    torch.save(model.state_dict(), out)


if __name__ == "__main__":
    main()
