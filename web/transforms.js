// SAM's image, prompt and mask transforms for the page: the JavaScript twins of
// edgesam/client/transforms.py (tests/test_demo_transforms.py runs both on the same inputs).
//
// The resize is Pillow's bilinear resampling (what segment-anything's ResizeLongestSide and
// the numpy client use), reproduced to the integer: a separable convolution whose support
// widens with the downscale factor, fixed-point weights and a uint8 result after each pass.
// A canvas drawImage resize would filter differently, and the encoder would see other pixels.

const PRECISION_BITS = 32 - 8 - 2; // Pillow's fixed-point weights for 8-bit images
const ONE = 2 ** PRECISION_BITS;
export const BOX_CORNER_LABELS = [2, 3];
export const PADDING_LABEL = -1;
export const MULTIMASK_TOKENS = [1, 2, 3]; // SAM's multimask outputs; token 0 is the single mask

/** [h, w] once the longest side is `size` (ResizeLongestSide.get_preprocess_shape). */
export function resizedShape(height, width, size) {
  const scale = size / Math.max(height, width);
  return [Math.trunc(height * scale + 0.5), Math.trunc(width * scale + 0.5)];
}

/** Pillow's bilinear weights from `inSize` to `outSize` samples: per output, the first input and fixed-point weights. */
function pillowWeights(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1.0);
  const support = filterScale; // the bilinear filter's support is 1, widened when downscaling
  const inverse = 1.0 / filterScale;
  const starts = new Int32Array(outSize);
  const weights = [];
  for (let i = 0; i < outSize; i++) {
    const center = (i + 0.5) * scale;
    const first = Math.max(Math.trunc(center - support + 0.5), 0);
    const last = Math.min(Math.trunc(center + support + 0.5), inSize);
    const row = [];
    let total = 0;
    for (let x = first; x < last; x++) {
      const w = Math.max(1 - Math.abs((x - center + 0.5) * inverse), 0);
      row.push(w);
      total += w;
    }
    starts[i] = first;
    weights.push(Int32Array.from(row, (w) => Math.trunc(0.5 + (total !== 0 ? w / total : w) * ONE)));
  }
  return { starts, weights };
}

function clip8(sum) {
  return Math.min(Math.max(Math.floor(sum / ONE), 0), 255);
}

/** One pass of Pillow's separable resize along rows (`horizontal`) or columns of an RGB image. */
function resamplePass(src, height, width, outSize, horizontal) {
  const { starts, weights } = pillowWeights(horizontal ? width : height, outSize);
  const [outH, outW] = horizontal ? [height, outSize] : [outSize, width];
  const out = new Uint8Array(outH * outW * 3);
  const stride = horizontal ? 3 : width * 3;
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const i = horizontal ? x : y;
      const k = weights[i];
      const base = horizontal ? (y * width + starts[i]) * 3 : (starts[i] * width + x) * 3;
      for (let c = 0; c < 3; c++) {
        let sum = ONE / 2;
        for (let t = 0; t < k.length; t++) sum += src[base + t * stride + c] * k[t];
        out[(y * outW + x) * 3 + c] = clip8(sum);
      }
    }
  }
  return out;
}

/**
 * Bilinear resize of an RGB uint8 image (H*W*3) to (outH, outW), bit-exact with Pillow's
 * Image.resize (13): the horizontal pass first, unless the height shrinks by more than twice
 * as many pixels as the width (each pass rounds to uint8, so the order shows in the result).
 */
export function resizeRgb(rgb, height, width, outH, outW) {
  const verticalFirst = height - outH > 0 && height - outH > (width - outW) * 2;
  let image = rgb;
  if (verticalFirst) {
    image = resamplePass(image, height, width, outH, false);
    return outW !== width ? resamplePass(image, outH, width, outW, true) : image;
  }
  if (outW !== width) image = resamplePass(image, height, width, outW, true);
  if (outH !== height) image = resamplePass(image, height, outW, outH, false);
  return image;
}

/** RGB bytes of RGBA pixels (a canvas ImageData's data): alpha is dropped, as the numpy client does. */
export function rgbFromRgba(rgba) {
  const rgb = new Uint8Array((rgba.length / 4) * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i];
    rgb[j + 1] = rgba[i + 1];
    rgb[j + 2] = rgba[i + 2];
  }
  return rgb;
}

/**
 * The encoder input of an RGB image: resize of the longest side to `size`, (x - mean) / std
 * in float32, zero padding at the bottom and right, channels first.
 * Returns { data: Float32Array(3 * size * size), inputHW: [h, w] }.
 */
export function preprocess(rgb, height, width, size, mean, std) {
  const [h, w] = resizedShape(height, width, size);
  const resized = resizeRgb(rgb, height, width, h, w);
  const data = new Float32Array(3 * size * size);
  const m = mean.map(Math.fround);
  const s = std.map(Math.fround);
  for (let c = 0; c < 3; c++) {
    const plane = c * size * size;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        data[plane + y * size + x] = Math.fround(resized[(y * w + x) * 3 + c] - m[c]) / s[c];
      }
    }
  }
  return { data, inputHW: [h, w] };
}

/** [x, y] points from the original image to the encoder's input frame (ResizeLongestSide.apply_coords). */
export function scaleCoords(points, originalHW, size) {
  const [h, w] = resizedShape(originalHW[0], originalHW[1], size);
  return points.map(([x, y]) => [x * (w / originalHW[1]), y * (h / originalHW[0])]);
}

/**
 * The decoder's prompt tokens for one object in SAM's order: the points, then the box's two
 * corners (labels 2, 3), or one padding point (label -1) without a box.
 * `points` [[x, y], ...] and `box` [x0, y0, x1, y1] or null are in the input frame.
 */
export function promptArrays(points, labels, box) {
  const coords = points.flat();
  const tokenLabels = [...labels];
  if (box) {
    coords.push(...box);
    tokenLabels.push(...BOX_CORNER_LABELS);
  } else {
    coords.push(0, 0);
    tokenLabels.push(PADDING_LABEL);
  }
  return { coords: Float32Array.from(coords), labels: Float32Array.from(tokenLabels), count: tokenLabels.length };
}

/** 1-D bilinear resampling as F.interpolate(align_corners=False): sparse rows {start, weights} of the (out, in) matrix. */
export function bilinearRows(outSize, inSize) {
  const rows = [];
  for (let i = 0; i < outSize; i++) {
    const src = Math.max((i + 0.5) * (inSize / outSize) - 0.5, 0);
    const low = Math.min(Math.floor(src), inSize - 1);
    const high = Math.min(low + 1, inSize - 1);
    const frac = src - low;
    rows.push(high === low ? { start: low, weights: [1] } : { start: low, weights: [1 - frac, frac] });
  }
  return rows;
}

/** The product of two sparse row matrices (first: (n, m), second: (m, k)), sparse again. */
function composeRows(first, second) {
  return first.map(({ start, weights }) => {
    const dense = new Map();
    weights.forEach((a, j) => {
      const row = second[start + j];
      row.weights.forEach((b, t) => dense.set(row.start + t, (dense.get(row.start + t) ?? 0) + a * b));
    });
    const columns = [...dense.keys()].sort((p, q) => p - q);
    const lo = columns[0];
    const out = new Array(columns[columns.length - 1] - lo + 1).fill(0);
    for (const c of columns) out[c - lo] = dense.get(c);
    return { start: lo, weights: out };
  });
}

/** The row maps of `upsampleLogits` along one axis: low-res -> padded input, crop, -> original. */
export function upsampleRows(lowSize, imgSize, inputSize, originalSize) {
  return composeRows(bilinearRows(originalSize, inputSize), bilinearRows(imgSize, lowSize).slice(0, inputSize));
}

/**
 * Low-res logits (h4 * w4, row-major) -> logits at the original image size (Sam.postprocess_masks):
 * bilinear to the padded input, crop of the padding, bilinear to the original, one sparse
 * product per axis. `maps` ({rows, cols} of upsampleRows) may be passed to reuse them per image.
 */
export function upsampleLogits(low, lowHW, imgSize, inputHW, originalHW, maps = null) {
  const { rows, cols } = maps ?? upsampleMaps(lowHW, imgSize, inputHW, originalHW);
  const [lowH, lowW] = lowHW;
  const [outH, outW] = originalHW;
  const across = new Float64Array(lowH * outW);
  for (let y = 0; y < lowH; y++) {
    for (let x = 0; x < outW; x++) {
      const { start, weights } = cols[x];
      let sum = 0;
      for (let t = 0; t < weights.length; t++) sum += low[y * lowW + start + t] * weights[t];
      across[y * outW + x] = sum;
    }
  }
  const out = new Float32Array(outH * outW);
  for (let y = 0; y < outH; y++) {
    const { start, weights } = rows[y];
    for (let x = 0; x < outW; x++) {
      let sum = 0;
      for (let t = 0; t < weights.length; t++) sum += across[(start + t) * outW + x] * weights[t];
      out[y * outW + x] = sum;
    }
  }
  return out;
}

/** Both axes' maps of `upsampleLogits` for one image (they depend on its size only). */
export function upsampleMaps(lowHW, imgSize, inputHW, originalHW) {
  return {
    rows: upsampleRows(lowHW[0], imgSize, inputHW[0], originalHW[0]),
    cols: upsampleRows(lowHW[1], imgSize, inputHW[1], originalHW[1]),
  };
}

/** 0 / 1 mask of logits above SAM's threshold. */
export function binaryMask(logits, threshold) {
  const mask = new Uint8Array(logits.length);
  for (let i = 0; i < logits.length; i++) mask[i] = logits[i] > threshold ? 1 : 0;
  return mask;
}

/**
 * Which of the decoder's four mask tokens to show: a single click is ambiguous, so SAM's three
 * multimask outputs compete on predicted IoU; a box or several clicks take the single-mask token.
 */
export function chooseToken(scores, pointCount, hasBox) {
  if (hasBox || pointCount !== 1) return 0;
  return MULTIMASK_TOKENS.reduce((best, t) => (scores[t] > scores[best] ? t : best), MULTIMASK_TOKENS[0]);
}
