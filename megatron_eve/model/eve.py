"""EVEModel: the encoder-free vision-language model on megatron-core.

First stage: token embedding + PEL + projector, visual tokens spliced at the image positions.
Every stage: its slice of the Llama decoder (megatron-core TransformerBlock) and the aligner
projections of the taps it holds. Last stage: output layer, LM loss, aligner fusion and loss
against the frozen CLIP teacher.

Between pipeline stages the activation carries, after its s rows of hidden states, the projected
aligner taps computed so far (packed into extra rows of the same width), so taps on any stage reach
the aligner through megatron-core's ordinary p2p exchange and autograd routes their gradients back.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_eve.config import ConfigError, EVEModelConfig, padded_vocab_size
from megatron_eve.model.aligner import PatchAligner, alignment_loss
from megatron_eve.model.attention import TorchAttention, carry_flat_rotary
from megatron_eve.model.lm_loss import vocab_parallel_lm_loss
from megatron_eve.model.patch_embedding import FlatPlan, PatchEmbeddingLayer, VisionProjection
from megatron_eve.model.specs import decoder_block_spec
from megatron_eve.model.teacher import CLIPTeacher
from megatron_eve.model.token_embedding import add_gradient_into_main_grad, with_distinct_rows
from megatron_eve.model.visual_layout import IMAGE_TOKEN_INDEX, VisualLayout, VisualLayoutError
from megatron_eve.platform import current_device

# What the last stage returns when given labels: per-token LM loss [b, s] (0 where not
# supervised), the sum over images of the align loss, and how many images it covers.
EVELosses = Tuple[Tensor, Tensor, Tensor]


class EVEModel(LanguageModule):
    def __init__(
        self,
        config: EVEModelConfig,
        transformer_config: TransformerConfig,
        *,
        transformer_impl: str = "auto",
        attention_backend: str = "auto",
        rope_fusion: bool = True,
        norm_kernel: str = "torch",
        torch_cross_entropy: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        load_teacher: bool = True,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=transformer_config)
        lm, vision, aligner = config.language, config.vision, config.aligner
        self.eve_config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.parallel_output = parallel_output
        self.torch_cross_entropy = torch_cross_entropy  # the LM loss of model/lm_loss.py, else megatron-core's
        self.share_embeddings_and_output_weights = False  # Vicuna's lm_head is untied
        self.model_type = ModelType.encoder_or_decoder
        self.vp_stage = vp_stage
        self.vocab_size = lm.vocab_size
        self.padded_vocab_size = padded_vocab_size(
            lm.vocab_size,
            lm.make_vocab_size_divisible_by,
            transformer_config.tensor_model_parallel_size,
        )
        self.input_tensor: Optional[Tensor] = None

        if pre_process:
            # Splicing needs the full sequence: scatter to sequence-parallel regions ourselves.
            self.embedding = LanguageModelEmbedding(
                config=transformer_config,
                vocab_size=self.padded_vocab_size,
                max_sequence_length=lm.max_position_embeddings,
                position_embedding_type="rope",
                scatter_to_sequence_parallel=False,
            )
            add_gradient_into_main_grad(self.embedding.word_embeddings)
            self.vision_model = PatchEmbeddingLayer(vision)
            self.vision_projection = VisionProjection(vision.hidden_size, lm.hidden_size)
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=transformer_config.kv_channels,
            rotary_percent=1.0,
            rotary_base=lm.rotary_base,
            use_cpu_initialization=transformer_config.use_cpu_initialization,
        )
        self.decoder = TransformerBlock(
            config=transformer_config,
            spec=decoder_block_spec(transformer_config, transformer_impl, vp_stage, attention_backend, rope_fusion,
                                    norm_kernel),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        # torch's kernels take RoPE over flat THD positions from the packed params (one launch per
        # layer, no host sync) instead of megatron-core's per-sample THD loop.
        self.flat_rotary = any(isinstance(m, TorchAttention) for m in self.decoder.modules())
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                lm.hidden_size,
                self.padded_vocab_size,
                config=transformer_config,
                init_method=transformer_config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=not parallel_output,
            )
        self.setup_embeddings_and_output_layer()

        # Aligner taps held by this stage, as (slot j, hidden-state index t).
        self.layer_offset = get_transformer_layer_offset(transformer_config, vp_stage)
        num_layers, local_layers = lm.num_layers, len(self.decoder.layers)
        self.taps = aligner.taps(num_layers) if aligner.enabled else []
        self.inner_taps = [  # outputs of decoder layers on this stage, ascending
            (j, t) for j, t in reversed(list(enumerate(self.taps)))
            if 0 < t < num_layers and self.layer_offset < t <= self.layer_offset + local_layers
        ]
        # Taps computed upstream and carried in: t == 0 and inner taps of earlier stages.
        self.num_carried_in = 0 if pre_process else sum(
            1 for t in self.taps if t < num_layers and t <= self.layer_offset
        )
        self.teacher: Optional[CLIPTeacher] = None
        if aligner.enabled:
            slots = [j for j, _ in self.inner_taps]
            if pre_process:
                slots.append(self.taps.index(0))
            if post_process:
                slots.append(self.taps.index(num_layers))
            self.aligner = PatchAligner(lm.hidden_size, aligner, sorted(slots), post_process)
            if post_process and load_teacher and aligner.teacher_path:
                self.teacher = CLIPTeacher(
                    aligner, vision, current_device(), transformer_config.params_dtype
                )

    # ----------------------------------------------------------------------------- pipeline glue
    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous stage's activation (megatron-core schedules pass a list)."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "EVEModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def _cells(self, layout: VisualLayout, hidden: Tensor) -> Tensor:
        """The aligner cells [V, H] of a decoder output [s, b, H], or of this rank's
        sequence-parallel shard [s/tp, b, H]: each rank pools the cells' tokens it holds and one
        all-reduce of [V, H] completes them — instead of gathering the whole sequence per tap.

        Every TP rank then holds the same cells and computes the same aligner terms; the
        all-reduce's backward is the identity, so each rank's tokens get their cells' gradient
        once (not summed over identical copies).

        The shares are all-reduced in fp32 and rounded to the hidden dtype once, as the unsharded
        path rounds: a cell cut by the shard border is not rounded twice. The cast's backward
        returns the gradient to the hidden dtype."""
        if not self.config.sequence_parallel:
            return layout.cells(hidden)
        first_row = hidden.shape[0] * self.tp_group.rank()
        shares = layout.cells(hidden, first_row)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(shares, group=self.tp_group).to(hidden.dtype)

    def _attach_carried(self, hidden: Tensor, carried: List[Tensor]) -> Tensor:
        if not carried:
            return hidden
        _, batch, width = hidden.shape
        flat = torch.cat([c.reshape(-1) for c in carried]).to(hidden.dtype)
        rows = math.ceil(flat.numel() / (batch * width))
        flat = F.pad(flat, (0, rows * batch * width - flat.numel()))
        return torch.cat([hidden, flat.view(rows, batch, width)], dim=0)

    def _detach_carried(
        self, received: Tensor, local_len: int, num_cells: int
    ) -> Tuple[Tensor, List[Tensor]]:
        width = self.eve_config.aligner.hidden_size
        count = self.num_carried_in if num_cells else 0
        _, batch, hidden = received.shape
        rows = math.ceil(count * num_cells * width / (batch * hidden))
        if received.shape[0] != local_len + rows:
            raise RuntimeError(
                f"pipeline stage received {received.shape[0]} rows, expected {local_len} hidden + "
                f"{rows} carrying {count} aligner taps of {num_cells} cells: stages disagree "
                "about the micro-batch (each stage must see the same tokens and image grids)"
            )
        if rows == 0:
            return received, []
        carried = received[local_len:].reshape(-1)[: count * num_cells * width]
        return received[:local_len], list(carried.view(count, num_cells, width).unbind(0))

    # ------------------------------------------------------------------------------ first stage
    def _embed(self, input_ids: Tensor, images, grid_hw: Optional[Tensor], layout_pool: int,
               layout: Optional[VisualLayout], pel_plan: Optional[FlatPlan]):
        """Token embeddings with visual tokens spliced in → ([s, b, H], layout or None). A layout
        and a PEL plan made by the loader spare building them here, in the per-micro-batch path
        (and the layout's build would wait on the device)."""
        is_visual = input_ids == IMAGE_TOKEN_INDEX
        # The visual positions' lookups are overwritten by the splice: each its own row (gradient zeros).
        ids = with_distinct_rows(input_ids, is_visual, self.embedding.word_embeddings.num_embeddings)
        embeddings = self.embedding(input_ids=ids, position_ids=None)
        if images is None:
            if layout.positions.numel() if layout is not None else bool(is_visual.any()):
                raise VisualLayoutError("the micro-batch has image-token positions but no images")
            return embeddings, None
        tokens, pel_grid = self.vision_model(images, plan=pel_plan)
        if grid_hw is not None and not torch.equal(grid_hw.cpu().view(-1, 2), pel_grid):
            raise VisualLayoutError(
                f"image grids from the pixels' masks {pel_grid.tolist()} differ from the "
                f"batch's image_grid_hw {grid_hw.view(-1, 2).tolist()}"
            )
        if layout is None:
            layout = VisualLayout.build(input_ids, pel_grid, layout_pool)
        elif not torch.equal(layout.grid_hw, pel_grid):
            raise VisualLayoutError(
                f"image grids from the pixels' masks {pel_grid.tolist()} differ from the batch's "
                f"planned layout {layout.grid_hw.tolist()}"
            )
        return layout.splice(embeddings, self.vision_projection(tokens)), layout

    # ---------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor,
        position_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        *,
        images: Optional[Union[Tensor, List[Tensor]]] = None,
        image_grid_hw: Optional[Tensor] = None,
        teacher_images: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        inference_context=None,
        visual_layout: Optional[VisualLayout] = None,
        teacher_patches: Optional[Tensor] = None,
        pel_plan: Optional[FlatPlan] = None,
    ) -> Union[Tensor, EVELosses]:
        """One micro-batch through this stage.

        input_ids [b, s]: token ids with IMAGE_TOKEN_INDEX at every visual position (each image's
          placeholder expanded to 1 + h(w+1) positions).
        labels [b, s]: next-token targets, already shifted (Megatron convention); negative values
          (IGNORE_INDEX, or an image token as target) carry no loss.
        attention_mask: None for causal, or [b, 1, s, s] bool, True = masked (block-diagonal for
          packed samples on the local path); packed_seq_params for THD with Transformer Engine.
          position_ids are not needed: RoPE is applied by position, and samples packed in one
          sequence never attend across their boundary, so relative positions are exact.
        images [N, 4, S, S] (first stage), image_grid_hw [N, 2] (every stage when training the
          aligner under PP>1), teacher_images [N, 4, L, L] (last stage when training the aligner).
        inference_context: a megatron-core StaticInferenceContext holding the KV cache; the
          caller advances its sequence_len_offset after each call.
        visual_layout: where the image tokens and aligner cells sit, planned on the host by the
          loader (data.loader.plan_batch) for input_ids as given; built here when absent.
        teacher_patches: flat indices of the teacher squares' valid patches (planned likewise).
        pel_plan: the PEL's FlatPlan of the crops' shapes (first stage; planned likewise); built
          by the PEL when absent.

        Returns the activation for the next stage, or on the last stage logits [b, s, V] without
        labels, and (lm_loss [b, s], align_loss_sum, align_images) with labels.
        """
        del position_ids
        seq_len = input_ids.shape[1]
        wants_align = self.training and self.eve_config.aligner.enabled
        if wants_align and images is not None and image_grid_hw is None and not (
            self.pre_process and self.post_process
        ):
            raise VisualLayoutError(
                "under pipeline parallelism every stage needs image_grid_hw to find the aligner's "
                "patch tokens; pass it with the micro-batch"
            )
        hidden, carried, layout = self._preprocess(input_ids, images, image_grid_hw, visual_layout, pel_plan,
                                                   wants_align)
        hidden = self._decode(hidden, carried, layout, seq_len, attention_mask, packed_seq_params,
                              inference_context)
        idle = self._idle_parameters_term(images is None, wants_align and layout is None)
        if not self.post_process:
            out = self._attach_carried(hidden, carried)
            return out if idle is None else out + idle.to(out.dtype)
        out = self._postprocess(hidden, carried, layout, labels, teacher_images, teacher_patches)
        if idle is None or isinstance(out, Tensor):
            return out
        lm_loss, align_sum, align_images = out
        return lm_loss, align_sum + idle, align_images

    def _idle_parameters_term(self, without_images: bool, without_cells: bool) -> Optional[Tensor]:
        """A zero that depends on every trainable parameter this stage left out of the micro-batch's
        graph: the vision model's when it had no images (first stage), the aligner's when it had no
        cells to align. Each then gets a zero gradient, as the reference's blank image and zero align
        loss give it; without one, megatron-core's overlapped gradient reduction (--overlap-grad-reduce)
        never starts the reduction of a bucket holding such a parameter when this is the step's last
        micro-batch, and fails at the step's end. None when nothing is idle (or not training)."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        idle = []
        if self.pre_process and without_images:
            idle += [self.vision_model, self.vision_projection]
        if without_cells:
            idle.append(self.aligner)
        params = [p for module in idle for p in module.parameters() if p.requires_grad]
        if not params:
            return None
        return torch.stack([p.sum(dtype=torch.float32) for p in params]).sum() * 0.0

    def _preprocess(self, input_ids: Tensor, images, image_grid_hw: Optional[Tensor],
                    visual_layout: Optional[VisualLayout], pel_plan: Optional[FlatPlan], wants_align: bool
                    ) -> Tuple[Tensor, List[Tensor], Optional[VisualLayout]]:
        """This stage's input → (hidden states [s/sp, b, H], aligner taps carried so far, the
        layout when the aligner has cells to align in this micro-batch, else None).

        First stage: embeddings with the visual tokens spliced in (tap 0 projected), scattered to
        the sequence-parallel regions. Later stages: the previous stage's activation, split into
        hidden states and the carried taps."""
        vision = self.eve_config.vision
        if self.pre_process:
            hidden, layout = self._embed(input_ids, images, image_grid_hw, vision.align_pool, visual_layout, pel_plan)
            carried = []
            if wants_align and layout is not None and layout.num_cells > 0:
                carried.append(self.aligner.project(self.taps.index(0), layout.cells(hidden)))
            else:
                layout = None
            if self.config.sequence_parallel:
                hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
            return hidden, carried, layout
        layout = None
        if wants_align and visual_layout is not None:
            layout = visual_layout
        elif wants_align and image_grid_hw is not None and image_grid_hw.numel():
            layout = VisualLayout.build(input_ids, image_grid_hw, vision.align_pool)
        if layout is not None and layout.num_cells == 0:
            layout = None
        sp_shards = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        hidden, carried = self._detach_carried(
            self.input_tensor, input_ids.shape[1] // sp_shards, layout.num_cells if layout is not None else 0
        )
        self.decoder.set_input_tensor(hidden)
        return hidden, carried, layout

    def _decode(self, hidden: Tensor, carried: List[Tensor], layout: Optional[VisualLayout], seq_len: int,
                attention_mask, packed_seq_params, inference_context) -> Tensor:
        """This stage's decoder layers; the taps among them are projected and appended to `carried`."""
        extract = {t - 1 for _, t in self.inner_taps} if layout is not None else None
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        # With a KV cache, attention picks each step's slice of the rotary table by offset.
        rotary_len = inference_context.max_sequence_length if inference_context is not None else seq_len
        rotary = self.rotary_pos_emb(rotary_len, packed_seq=thd)
        if thd and self.flat_rotary:
            carry_flat_rotary(packed_seq_params, rotary, self.config.params_dtype)
            rotary = None
        out = self.decoder(
            hidden_states=hidden,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary,
            packed_seq_params=packed_seq_params,
            inference_context=inference_context,
            extract_layer_indices=extract,
        )
        if not extract:
            return out
        hidden, intermediates = out
        if len(intermediates) != len(self.inner_taps):
            raise RuntimeError(
                f"decoder returned {len(intermediates)} of {len(self.inner_taps)} aligner taps"
            )
        for (slot, _), tapped in zip(self.inner_taps, intermediates):
            carried.append(self.aligner.project(slot, self._cells(layout, tapped)))
        return hidden

    def _postprocess(self, hidden: Tensor, carried: List[Tensor], layout: Optional[VisualLayout],
                     labels: Optional[Tensor], teacher_images, teacher_patches) -> Union[Tensor, EVELosses]:
        """Last stage: logits [b, s, V] without labels; else (per-token LM loss, align loss sum,
        images aligned)."""
        logits, _ = self.output_layer(hidden)
        if labels is None:
            return self._mask_padded_vocab(logits).transpose(0, 1).contiguous()
        supervised, targets = labels >= 0, labels.clamp(min=0)
        if self.torch_cross_entropy:  # leaves the padded vocabulary out itself
            group = self.tp_group if self.parallel_output else None
            lm_loss = vocab_parallel_lm_loss(logits, targets, self.vocab_size, group)
        else:
            lm_loss = self.compute_language_model_loss(targets, self._mask_padded_vocab(logits))
        lm_loss = lm_loss * supervised
        if layout is None:
            return lm_loss, lm_loss.new_zeros(()), lm_loss.new_zeros(())
        return (lm_loss, *self._align_loss(hidden, carried, layout, teacher_images, teacher_patches))

    # ------------------------------------------------------------------------------- last stage
    def _mask_padded_vocab(self, logits: Tensor) -> Tensor:
        """Padding rows of the vocabulary never win a softmax (Megatron pads for TP alignment)."""
        if self.padded_vocab_size == self.vocab_size:
            return logits
        local = logits.shape[-1]
        start = local * self.tp_group.rank() if self.parallel_output else 0
        first_pad = self.vocab_size - start
        if first_pad >= local:
            return logits
        is_pad = torch.arange(local, device=logits.device) >= max(first_pad, 0)
        return logits.masked_fill(is_pad, torch.finfo(logits.dtype).min)

    def _align_loss(self, final_hidden, carried, layout: VisualLayout, teacher_images, teacher_patches=None):
        if self.teacher is None:
            raise ConfigError(
                "the aligner is enabled but no vision teacher is loaded: pass the CLIP teacher's "
                "local folder (aligner.teacher_path / --vision-teacher-path) or disable the aligner"
            )
        if teacher_images is None:
            raise VisualLayoutError("training the aligner needs teacher_images on the last stage")
        final_cells = self._cells(layout, final_hidden)
        query = self.aligner.project(self.taps.index(self.eve_config.language.num_layers), final_cells)
        keys = torch.stack(carried[::-1], dim=1)  # carried ascend in depth; slots descend
        prediction = self.aligner.predict(final_cells, query, keys)
        # Every TP rank needs the same targets: each encodes 1/TP of the images.
        split = self.tp_group if self.config.tensor_model_parallel_size > 1 else None
        target = self.teacher.patch_features(teacher_images, teacher_patches, split_over=split)
        return alignment_loss(prediction, target, layout.cell_image, layout.num_images)


def eve_loss(
    lm_loss: Tensor, align_sum: Tensor, align_images: Tensor, labels: Tensor, align_weight: float
):
    """A micro-batch's total loss as EVE defines it (eve.md §4): the token-weighted mean LM loss
    over supervised tokens plus weight x the mean align loss over images. → (total, lm, align).

    The first three arguments are what the last stage returns, in order."""
    tokens = (labels >= 0).sum().clamp(min=1)
    lm = lm_loss.sum() / tokens
    align = align_sum / align_images.clamp(min=1)
    return lm + align_weight * align, lm, align
