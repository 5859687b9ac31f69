// The bundle's encoder and decoder in onnxruntime-web: loading (with the checks OnnxPredictor
// makes on shapes), one encoder run per image and one decoder run per prompt change.
import {
  binaryMask, chooseToken, preprocess, promptArrays, scaleCoords, upsampleLogits, upsampleMaps,
} from './transforms.js';

const ORT_MODULES = { wasm: '/ort/ort.wasm.min.mjs', webgpu: '/ort/ort.webgpu.min.mjs' };
export const ENCODER_ROLES = { encoder: 'fp32', encoder_int8: 'int8', encoder_fp16: 'fp16' };
// The page's decoders: the client interface (N prompt sets, mask input) in each precision the bundle has.
export const DECODER_ROLES = { decoder: 'fp32', decoder_int8: 'int8', decoder_fp16: 'fp16' };
// Click-path runs on a random embedding after loading: enough for Chromium's WebAssembly tier-up (docs/DEMO.md).
const WARM_UP_DECODER_RUNS = 10;
let runtime = null;

/** `n` values in [-1, 1) from a fixed linear congruential stream (the same warm-up on every load). */
function uniformNoise(n) {
  const values = new Float32Array(n);
  let seed = 1;
  for (let i = 0; i < n; i++) {
    seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
    values[i] = seed / 2 ** 31 - 1;
  }
  return values;
}

/** onnxruntime-web for `backend`, set up once per page (its thread count cannot change later). */
export async function onnxRuntime(backend = 'wasm', threads = 0) {
  if (runtime) return runtime;
  if (!(backend in ORT_MODULES)) throw new Error(`unknown backend ${backend}: use wasm or webgpu`);
  if (backend === 'webgpu' && !navigator.gpu) throw new Error('this browser has no WebGPU: use the WebAssembly backend');
  const ort = await import(ORT_MODULES[backend]);
  ort.env.wasm.wasmPaths = '/ort/';
  // Threads need SharedArrayBuffer (a cross-origin isolated page); onnxruntime-web's default is half the cores.
  const available = self.crossOriginIsolated ? navigator.hardwareConcurrency || 1 : 1;
  ort.env.wasm.numThreads = threads > 0 ? Math.min(threads, available) : available;
  runtime = { ort, backend, threads: ort.env.wasm.numThreads };
  return runtime;
}

export async function fetchConfig() {
  const response = await fetch('/bundle/config.json');
  if (!response.ok) throw new Error(`the bundle's config.json cannot be loaded: ${await response.text()}`);
  const config = await response.json();
  if (config.format !== 'edgesam-bundle' || !config.files) throw new Error('config.json is not an EdgeSAM bundle config');
  return config;
}

/** The bytes of the bundle file of `role` (the server refuses one that no longer matches its SHA-256). */
export async function fetchFile(config, role) {
  const entry = config.files[role];
  if (!entry) throw new Error(`the bundle has no ${role} file (it has: ${Object.keys(config.files).join(', ')})`);
  const response = await fetch(`/bundle/${entry.file}`);
  if (!response.ok) throw new Error(`${entry.file} (${role}) cannot be loaded: ${await response.text()}`);
  return new Uint8Array(await response.arrayBuffer());
}

export async function createSession(config, role, options = {}) {
  const { ort, backend } = runtime;
  const bytes = await fetchFile(config, role);
  const executionProviders = backend === 'webgpu' ? ['webgpu', 'wasm'] : ['wasm'];
  try {
    return await ort.InferenceSession.create(bytes, { executionProviders, graphOptimizationLevel: 'all', ...options });
  } catch (error) {
    throw new Error(`${config.files[role].file} (${role}) cannot be loaded by onnxruntime-web: ${error.message}`);
  }
}

function metadataShape(list, name) {
  const entry = name ? list.find((m) => m.name === name) : list[0];
  return entry ? Array.from(entry.shape) : null;
}

const same = (a, b) => a !== null && b !== null && a.length === b.length && a.every((v, i) => v === b[i]);

/** The files agree with config.json and with each other, as OnnxPredictor checks (a foreign file fails here). */
export function checkShapes(config, encoder, decoder) {
  const size = config.img_size;
  const input = metadataShape(encoder.inputMetadata);
  const embedding = metadataShape(encoder.outputMetadata);
  const decoderInput = metadataShape(decoder.inputMetadata, 'image_embeddings');
  if (!same(input, [1, 3, size, size])) {
    throw new Error(`encoder input shape [${input}] does not match img_size ${size} in config.json`);
  }
  if (!same(embedding, decoderInput) || !same(embedding.slice(2), config.embedding_size)) {
    throw new Error(`encoder output [${embedding}] and decoder input [${decoderInput}] do not match the embedding `
      + `size [${config.embedding_size}] in config.json`);
  }
}

/** One image's encoding and the decoder calls on it. */
export class Segmenter {
  constructor(config, encoder, decoder) {
    checkShapes(config, encoder, decoder);
    Object.assign(this, { config, encoder, decoder });
    this.grid = config.embedding_size;
    this.lowHW = [4 * this.grid[0], 4 * this.grid[1]];
  }

  static async load(config, encoderRole, decoderRole = 'decoder') {
    // One after the other: onnxruntime-web's WebGPU provider refuses a session while another is
    // being created ("another WebGPU EP inference session is being created").
    const encoder = await createSession(config, encoderRole);
    const decoder = await createSession(config, decoderRole);
    return new Segmenter(config, encoder, decoder);
  }

  /**
   * Run a click's whole path `decoderRuns` times (decoder run, mask upscaling to an img_size
   * square, threshold) on a random embedding, so that the first clicks run at full speed:
   * browsers compile WebAssembly and JavaScript with a baseline compiler first and optimise the
   * hot functions during the first runs (in Chromium the first 4-6 clicks took 1.5-2.5x the
   * later ones without it, docs/DEMO.md). Not zeros: on a zero embedding the kernels take
   * shorter paths and stay half-optimised (the first clicks after such a warm-up were still
   * 1.5x slower). The encoder is not warmed up: that bought nothing measurable for the first
   * image. Returns the milliseconds spent.
   */
  async warmUp(decoderRuns = WARM_UP_DECODER_RUNS) {
    const { ort } = runtime;
    const start = performance.now();
    const shape = metadataShape(this.encoder.outputMetadata);
    const embedding = new ort.Tensor('float32', uniformNoise(shape.reduce((a, b) => a * b, 1)), shape);
    const size = this.config.img_size;
    const square = [size, size];
    const maps = upsampleMaps(this.lowHW, size, square, square);
    for (let i = 0; i < decoderRuns; i++) {
      const { masks } = await this.decode(embedding, promptArrays([[size / 2, size / 2]], [1], null));
      this.binaryMaskOf(masks, 0, square, square, maps);
    }
    return performance.now() - start;
  }

  /** The 0 / 1 mask at `originalHW` of mask token `token` of the decoder's low-res `masks`. */
  binaryMaskOf(masks, token, inputHW, originalHW, maps) {
    const plane = this.lowHW[0] * this.lowHW[1];
    const low = masks.data.subarray(token * plane, (token + 1) * plane);
    const logits = upsampleLogits(low, this.lowHW, this.config.img_size, inputHW, originalHW, maps);
    return binaryMask(logits, this.config.mask_threshold);
  }

  /** One decoder run on `embedding` for the prompt arrays of `promptArrays` (coordinates at the input size). */
  decode(embedding, prompt) {
    const { ort } = runtime;
    return this.decoder.run({
      image_embeddings: embedding,
      point_coords: new ort.Tensor('float32', prompt.coords, [1, prompt.count, 2]),
      point_labels: new ort.Tensor('float32', prompt.labels, [1, prompt.count]),
      mask_input: new ort.Tensor('float32', new Float32Array(this.lowHW[0] * this.lowHW[1]), [1, 1, ...this.lowHW]),
      has_mask_input: new ort.Tensor('float32', new Float32Array([0]), [1]),
    });
  }

  /** Encode an RGB image (Uint8Array H*W*3); returns the milliseconds of preprocessing and of the encoder run. */
  async setImage(rgb, height, width) {
    const { ort } = runtime;
    const { config } = this;
    const start = performance.now();
    const { data, inputHW } = preprocess(rgb, height, width, config.img_size, config.pixel_mean, config.pixel_std);
    const image = new ort.Tensor('float32', data, [1, 3, config.img_size, config.img_size]);
    const encodeStart = performance.now();
    const outputs = await this.encoder.run({ image }, [this.encoder.outputNames[0]]);
    const encodeEnd = performance.now();
    this.embeddings = outputs[this.encoder.outputNames[0]];
    this.originalHW = [height, width];
    this.inputHW = inputHW;
    this.maps = upsampleMaps(this.lowHW, config.img_size, inputHW, this.originalHW);
    return { preprocessMs: encodeStart - start, encoderMs: encodeEnd - encodeStart };
  }

  /**
   * The mask of one object: points [[x, y], ...] with labels 1 / 0 and an optional box
   * [x0, y0, x1, y1], in pixels of the image. Returns the 0 / 1 mask (H*W), the chosen
   * token's predicted IoU and the milliseconds of the decoder run and of the mask upscaling.
   */
  async segment(points, labels, box) {
    const { config } = this;
    const scaled = scaleCoords(points, this.originalHW, config.img_size);
    const scaledBox = box ? scaleCoords([box.slice(0, 2), box.slice(2)], this.originalHW, config.img_size).flat() : null;
    const prompt = promptArrays(scaled, labels, scaledBox);
    const start = performance.now();
    const { scores, masks } = await this.decode(this.embeddings, prompt);
    const decoded = performance.now();
    const token = chooseToken(scores.data, points.length, Boolean(box));
    const mask = this.binaryMaskOf(masks, token, this.inputHW, this.originalHW, this.maps);
    return { mask, token, score: scores.data[token], decoderMs: decoded - start, maskMs: performance.now() - decoded };
  }
}
