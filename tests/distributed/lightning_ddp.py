"""Lightning's DDP strategy on 2 CPU processes with the modaldiag callback (run as a script:
Lightning re-launches it for rank 1). Each rank saves its final parameters to OUT/rank<r>.pt."""

import sys

import lightning.pytorch as pl
import torch

import modaldiag as md
from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule


def main(out: str, regulator: str) -> None:
    d = md.datasets.synthetic(n_samples=400, num_classes=3, strength={"a": 2.0, "b": 0.6},
                              dims={"a": 8, "b": 8}, seed=0)
    torch.manual_seed(0)
    lit = ModalDiagModule(md.models.default_model(d, feature_dim=8), lr=0.05, weight_decay=0.0)
    reg = {"OGM-GE": md.OGM(noise=True), "InfoReg": md.InfoReg(), "MMPareto": md.MMPareto()}[regulator]
    trainer = pl.Trainer(max_epochs=2, strategy="ddp", accelerator="cpu", devices=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ModalDiagCallback(reg)])
    loader = torch.utils.data.DataLoader(d.train, batch_size=32, shuffle=True)
    trainer.fit(lit, loader)
    flat = torch.cat([p.detach().reshape(-1) for p in lit.model.parameters()])
    torch.save(flat, f"{out}/{regulator}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
