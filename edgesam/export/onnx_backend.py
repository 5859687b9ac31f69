"""Exported ONNX files behind the evaluation engine, so an exported file is measured by the same
`Segmenter.segment` (same prompts, same mask selection, same upsampling) as the PyTorch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from segment_anything.modeling import Sam
from torch import nn

from edgesam.client.transforms import decoder_feeds, prompt_arrays
from edgesam.eval.engine import Segmenter
from edgesam.export.onnx import session
from edgesam.models.decoding import MASK_SLICES


class OnnxEncoder(nn.Module):
    """An encoder file as a `Sam.image_encoder`: (1, 3, S, S) tensor -> embedding tensor."""

    def __init__(self, session: ort.InferenceSession, img_size: int):
        super().__init__()
        self.session, self.img_size = session, img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["image_embeddings"], {"image": x.cpu().numpy()})[0])


class OnnxDecode:
    """`edgesam.models.decoding.decode` run by a `decoder.onnx` file (N prompts in one call)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session

    def __call__(self, sam: Sam, image_embeddings: torch.Tensor, points: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                 mask_input: torch.Tensor | None = None, num_outputs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        def array(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().cpu().numpy()

        coords, token_labels = prompt_arrays(array(points), array(labels), array(boxes))
        feeds = decoder_feeds(array(image_embeddings), coords, token_labels, array(mask_input))
        scores, low = self.session.run(None, feeds)
        keep = MASK_SLICES[num_outputs]
        return torch.from_numpy(low[:, keep]), torch.from_numpy(scores[:, keep])


def onnx_segmenter(name: str, sam: Sam, encoder: Path, decoder: Path, threads: int | None = None) -> Segmenter:
    """A `Segmenter` whose encoder and decoder are exported files; `sam` lends the pre- and
    post-processing (input size, mask upsampling, threshold), not its weights."""
    shell = Sam(OnnxEncoder(session(encoder, threads), sam.image_encoder.img_size), sam.prompt_encoder,
                sam.mask_decoder, pixel_mean=sam.pixel_mean.flatten().tolist(),
                pixel_std=sam.pixel_std.flatten().tolist())
    return Segmenter(name, shell.eval(), decoder=OnnxDecode(session(decoder, threads)))
