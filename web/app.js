// The demo page: open or drop an image, click points or drag a box, see the mask.
// window.edgesam exposes the page's state (status, the prompt in image pixels, the mask) so
// that a headless browser test can compare it with OnnxPredictor on the same prompt.
import { DECODER_ROLES, ENCODER_ROLES, Segmenter, fetchConfig, onnxRuntime } from './model.js';
import { rgbFromRgba } from './transforms.js';

const $ = (id) => document.getElementById(id);
const DRAG_PIXELS = 5; // a press that moves less than this (screen pixels) is a click
const MASK_RGBA = [30, 144, 255, 115];
const params = new URLSearchParams(location.search);
// ?warmup=N: click-path runs on a random embedding after loading (0: no warm-up at all); default in model.js
const WARM_UP_RUNS = params.has('warmup') ? Number(params.get('warmup')) : undefined;
const state = {
  status: 'starting', error: '', encodes: 0, decodes: 0, points: [], labels: [], box: null,
  width: 0, height: 0, mask: null, score: null, token: null, timings: {}, backend: null, threads: null, warmUpMs: null,
};
window.edgesam = {
  state,
  /** The current mask as base64 of H*W bytes (0 / 1), for tests. */
  maskBase64: () => (state.mask ? btoa(Array.from(state.mask, (v) => String.fromCharCode(v)).join('')) : null),
};
let config = null;
let segmenter = null;
let modelsReady = false; // loaded and warmed up: an image opened before then is encoded when they are
let rgb = null;
let imageName = 'image';

function setStatus(status, text) {
  state.status = status;
  $('status').textContent = text;
  $('status').classList.toggle('error', status === 'error');
}

function fail(error) {
  state.error = error.message ?? String(error);
  setStatus('error', state.error);
  console.error(error);
}

function showTimings() {
  const t = state.timings;
  const parts = [];
  if (t.encoderMs === undefined && state.warmUpMs !== null) parts.push(`warm-up ${state.warmUpMs.toFixed(0)} ms`);
  if (t.encoderMs !== undefined) parts.push(`encoder ${t.encoderMs.toFixed(0)} ms (+ ${t.preprocessMs.toFixed(0)} ms resize)`);
  if (t.decoderMs !== undefined) parts.push(`decoder ${t.decoderMs.toFixed(0)} ms (+ ${t.maskMs.toFixed(0)} ms mask upscaling)`);
  const where = `${state.backend === 'webgpu' ? 'WebGPU' : 'WebAssembly'}, ${state.threads} thread${state.threads > 1 ? 's' : ''}`;
  $('timings').textContent = parts.length ? `${parts.join(' · ')} — ${where}` : '';
}

function fitCanvases(width, height) {
  for (const canvas of [$('image'), $('overlay')]) {
    canvas.width = width;
    canvas.height = height;
  }
}

/** Decode an image file to RGB pixels exactly as stored (no colour management, no premultiplied alpha). */
async function readImage(blob, name) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  } catch {
    throw new Error(`${name} cannot be read as an image (${blob.type || 'unknown type'}): open a PNG, JPEG, WebP, GIF or BMP file`);
  }
  fitCanvases(bitmap.width, bitmap.height);
  const context = $('image').getContext('2d', { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  return rgbFromRgba(context.getImageData(0, 0, bitmap.width, bitmap.height).data);
}

async function encode() {
  setStatus('encoding', `encoding ${imageName} (${state.width}×${state.height})…`);
  const times = await segmenter.setImage(rgb, state.height, state.width);
  state.timings = times;
  state.encodes += 1;
  showTimings();
  setStatus('ready', `${imageName}: click a point or drag a box`);
  await decodeSoon();
}

async function openImage(blob, name) {
  try {
    imageName = name;
    setStatus('reading', `reading ${name}…`);
    rgb = await readImage(blob, name);
    [state.height, state.width] = [$('image').height, $('image').width];
    $('stage').classList.add('loaded');
    clearPrompt();
    if (modelsReady) await encode(); // else switchModels encodes it once the models are warm
  } catch (error) {
    fail(error);
  }
}

function clearPrompt() {
  Object.assign(state, { points: [], labels: [], box: null, mask: null, score: null, token: null });
  $('save').disabled = true;
  draw();
}

let decoding = false;
let pending = false;

/** Decode the current prompt; prompt changes during a decoder run are decoded right after it. */
async function decodeSoon() {
  pending = true;
  if (decoding) return;
  decoding = true;
  try {
    while (pending) {
      pending = false;
      await decodeNow();
    }
  } catch (error) {
    fail(error);
  } finally {
    decoding = false;
  }
}

async function decodeNow() {
  if (!segmenter?.embeddings || (!state.points.length && !state.box)) {
    Object.assign(state, { mask: null });
    draw();
    return;
  }
  const points = state.points.map((p) => [...p]);
  const result = await segmenter.segment(points, [...state.labels], state.box ? [...state.box] : null);
  Object.assign(state, { mask: result.mask, score: result.score, token: result.token });
  Object.assign(state.timings, { decoderMs: result.decoderMs, maskMs: result.maskMs });
  state.decodes += 1;
  $('save').disabled = false;
  showTimings();
  draw();
}

function drawMask(context) {
  const image = context.createImageData(state.width, state.height);
  for (let i = 0; i < state.mask.length; i++) {
    if (state.mask[i]) image.data.set(MASK_RGBA, i * 4);
  }
  context.putImageData(image, 0, 0);
}

function draw(dragBox = null) {
  const context = $('overlay').getContext('2d');
  context.clearRect(0, 0, state.width, state.height);
  if (state.mask) drawMask(context);
  const unit = Math.max(2, Math.max(state.width, state.height) / 200);
  context.lineWidth = unit;
  for (const box of [state.box, dragBox].filter(Boolean)) {
    context.strokeStyle = box === dragBox ? '#ffd400' : '#ffffff';
    context.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
  state.points.forEach(([x, y], i) => {
    context.beginPath();
    context.arc(x, y, 2.5 * unit, 0, 2 * Math.PI);
    context.fillStyle = state.labels[i] ? '#21c45d' : '#e5484d';
    context.fill();
    context.strokeStyle = '#ffffff';
    context.stroke();
  });
}

/** A pointer event's position in image pixels (the canvas is scaled to fit the page). */
function imagePoint(event) {
  const rect = $('overlay').getBoundingClientRect();
  const x = ((event.clientX - rect.left) * state.width) / rect.width;
  const y = ((event.clientY - rect.top) * state.height) / rect.height;
  return [Math.min(Math.max(x, 0), state.width), Math.min(Math.max(y, 0), state.height)];
}

function boxOf([x0, y0], [x1, y1]) {
  return [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
}

function wirePointer() {
  const overlay = $('overlay');
  let press = null;
  overlay.addEventListener('contextmenu', (event) => event.preventDefault());
  overlay.addEventListener('pointerdown', (event) => {
    if (!segmenter?.embeddings) return;
    overlay.setPointerCapture(event.pointerId);
    press = { at: imagePoint(event), screen: [event.clientX, event.clientY], button: event.button, shift: event.shiftKey };
  });
  overlay.addEventListener('pointermove', (event) => {
    if (press) draw(boxOf(press.at, imagePoint(event)));
  });
  overlay.addEventListener('pointerup', (event) => {
    if (!press) return;
    const moved = Math.hypot(event.clientX - press.screen[0], event.clientY - press.screen[1]);
    if (moved < DRAG_PIXELS) {
      const background = press.button === 2 || press.shift || document.querySelector('input[name=label]:checked').value === '0';
      state.points.push(press.at);
      state.labels.push(background ? 0 : 1);
    } else {
      state.box = boxOf(press.at, imagePoint(event));
    }
    press = null;
    draw();
    decodeSoon();
  });
}

function saveMask() {
  const canvas = document.createElement('canvas');
  [canvas.width, canvas.height] = [state.width, state.height];
  const context = canvas.getContext('2d');
  const image = context.createImageData(state.width, state.height);
  for (let i = 0; i < state.mask.length; i++) image.data.set(state.mask[i] ? [255, 255, 255, 255] : [0, 0, 0, 255], i * 4);
  context.putImageData(image, 0, 0);
  canvas.toBlob((blob) => {
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = `${imageName.replace(/\.[^.]+$/, '')}_mask.png`;
    link.click();
    URL.revokeObjectURL(link.href);
  }, 'image/png');
}

function wireControls() {
  $('file').addEventListener('change', () => {
    const file = $('file').files[0];
    if (file) openImage(file, file.name);
  });
  const stage = $('stage');
  stage.addEventListener('dragover', (event) => { event.preventDefault(); stage.classList.add('dragging'); });
  stage.addEventListener('dragleave', () => stage.classList.remove('dragging'));
  stage.addEventListener('drop', (event) => {
    event.preventDefault();
    stage.classList.remove('dragging');
    const file = event.dataTransfer.files[0];
    if (file) openImage(file, file.name);
  });
  $('undo').addEventListener('click', () => {
    if (state.box && !state.points.length) state.box = null;
    else { state.points.pop(); state.labels.pop(); }
    draw();
    decodeSoon();
  });
  $('clear').addEventListener('click', () => { clearPrompt(); });
  $('save').addEventListener('click', saveMask);
  $('encoder').addEventListener('change', switchModels);
  $('decoder').addEventListener('change', switchModels);
  $('backend').addEventListener('change', () => {
    params.set('backend', $('backend').value);
    location.search = params.toString();
  });
}

async function switchModels() {
  const [encoder, decoder] = [$('encoder').value, $('decoder').value];
  try {
    modelsReady = false;
    setStatus('loading', `loading ${config.files[encoder].file} and ${config.files[decoder].file}…`);
    segmenter = await Segmenter.load(config, encoder, decoder);
    Object.assign(state, { encoder, decoder });
    if (WARM_UP_RUNS !== 0) {
      setStatus('warming', 'warming up the decoder…');
      state.warmUpMs = await segmenter.warmUp(WARM_UP_RUNS);
      showTimings();
    }
    modelsReady = true;
    if (rgb) await encode();
    else setStatus('ready', 'open or drop an image');
  } catch (error) {
    fail(error);
  }
}

/** One <select> per model part: the bundle's precisions of it; the URL's choice (?encoder=, ?decoder=), else `preferred`. */
function fillSelector(id, precisions, preferred) {
  const roles = Object.keys(precisions).filter((role) => role in config.files);
  for (const role of roles) {
    const entry = config.files[role];
    $(id).add(new Option(`${precisions[role]} (${entry.file}, ${(entry.bytes / 2 ** 20).toFixed(1)} MiB)`, role));
  }
  const wanted = params.get(id);
  $(id).value = roles.includes(wanted) ? wanted : (roles.includes(preferred) ? preferred : roles[0]);
}

function fillSelectors() {
  fillSelector('encoder', ENCODER_ROLES, 'encoder');
  // The int8 decoder by default: 1.3-1.7x faster per click in WebAssembly, mIoU within 0.001 of fp32 (docs/DEMO.md).
  fillSelector('decoder', DECODER_ROLES, 'decoder_int8');
  $('backend').value = state.backend;
  $('backend').querySelector('[value=webgpu]').disabled = !navigator.gpu;
}

async function main() {
  wireControls();
  wirePointer();
  try {
    config = await fetchConfig();
    const ort = await onnxRuntime(params.get('backend') ?? 'wasm', Number(params.get('threads') ?? 0));
    Object.assign(state, { backend: ort.backend, threads: ort.threads });
    $('bundle').textContent = `${config.model?.backbone ?? "student"} at ${config.img_size}×${config.img_size}, `
      + `embedding ${config.embedding_size.join('×')}; onnxruntime-web ${ort.ort.env.versions?.web ?? ''}`;
    fillSelectors();
    await switchModels();
  } catch (error) {
    fail(error);
  }
}

main();
