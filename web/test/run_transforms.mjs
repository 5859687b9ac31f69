// Runs web/transforms.js on the cases a test wrote (CASE_DIR/cases.json and raw little-endian
// binaries beside it) and writes what it computed to CASE_DIR/results.json and *.out.bin, so
// that tests/test_demo_transforms.py can compare each result with edgesam/client/transforms.py.
//
//   node web/test/run_transforms.mjs CASE_DIR
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  binaryMask, chooseToken, preprocess, promptArrays, resizedShape, scaleCoords, upsampleLogits,
} from '../transforms.js';

const dir = process.argv[2];
if (!dir) throw new Error('usage: node web/test/run_transforms.mjs CASE_DIR');
const cases = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8'));
const bytes = (name) => new Uint8Array(readFileSync(join(dir, name)));
const floats = (name) => {
  const raw = readFileSync(join(dir, name));
  return new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
};
const save = (name, array) => writeFileSync(join(dir, name), Buffer.from(array.buffer, array.byteOffset, array.byteLength));

const results = { preprocess: [], upsample: [], prompts: [], tokens: [], shapes: [] };
cases.preprocess.forEach((c, i) => {
  const { data, inputHW } = preprocess(bytes(c.image), c.height, c.width, c.size, c.mean, c.std);
  save(`preprocess${i}.out.bin`, data);
  results.preprocess.push({ output: `preprocess${i}.out.bin`, inputHW });
});
cases.upsample.forEach((c, i) => {
  const logits = upsampleLogits(floats(c.low), c.lowHW, c.imgSize, c.inputHW, c.originalHW);
  save(`upsample${i}.out.bin`, logits);
  save(`upsample${i}.mask.bin`, binaryMask(logits, c.threshold));
  results.upsample.push({ output: `upsample${i}.out.bin`, mask: `upsample${i}.mask.bin` });
});
cases.prompts.forEach((c) => {
  const points = scaleCoords(c.points, c.originalHW, c.size);
  const box = c.box ? scaleCoords([c.box.slice(0, 2), c.box.slice(2)], c.originalHW, c.size).flat() : null;
  const { coords, labels } = promptArrays(points, c.labels, box);
  results.prompts.push({ coords: Array.from(coords), labels: Array.from(labels) });
});
cases.tokens.forEach((c) => results.tokens.push(chooseToken(c.scores, c.pointCount, c.hasBox)));
cases.shapes.forEach(([h, w, size]) => results.shapes.push(resizedShape(h, w, size)));
writeFileSync(join(dir, 'results.json'), JSON.stringify(results));
