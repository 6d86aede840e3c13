// Run a compiled agf-onnx model in onnxruntime-node or onnxruntime-web (WASM, under Node).
//
//   node explain.mjs node|wasm SPEC.json
//
// SPEC: a list of jobs run in one process (one runtime start-up), each {"model": path, "inputs": {name: {"file": raw little-endian path, "dtype": "float32"|"int64"|…,
// "shape": [...]}}, "outputs": [names], "out": folder, "threads": n, "runs": n}. Writes each output's raw
// bytes to OUT/NAME.bin and OUT/result.json = {runtime, inputNames, outputs: {name: {dtype, shape}}, ms: [...]}
// (createMs: the session's creation; ms: the wall time of each run after the first, for tools/bench_web.py).
import fs from 'node:fs';
import path from 'node:path';

const [runtime, specPath] = process.argv.slice(2);
if (!['node', 'wasm'].includes(runtime) || !specPath) {
  console.error('usage: node explain.mjs node|wasm SPEC.json');
  process.exit(2);
}
const jobs = JSON.parse(fs.readFileSync(specPath, 'utf8'));
const ort = runtime === 'node' ? await import('onnxruntime-node') : await import('onnxruntime-web');
const ARRAYS = { float32: Float32Array, int64: BigInt64Array, int32: Int32Array, uint8: Uint8Array, int8: Int8Array };

if (runtime === 'wasm') ort.env.wasm.numThreads = jobs[0]?.threads ?? 1;  // fixed at the WASM start-up
for (const spec of jobs) {
  const options = runtime === 'wasm' ? { executionProviders: ['wasm'] } : { intraOpNumThreads: spec.threads ?? 1 };
  const created = performance.now();
  const session = await ort.InferenceSession.create(fs.readFileSync(spec.model), options);
  const createMs = performance.now() - created;
  const feeds = {};
  for (const [name, input] of Object.entries(spec.inputs)) {
    const bytes = fs.readFileSync(input.file);
    const array = new ARRAYS[input.dtype](bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    feeds[name] = new ort.Tensor(input.dtype, array, input.shape);
  }
  const names = spec.outputs ?? session.outputNames;
  let results = await session.run(feeds, names);
  const ms = [];
  for (let i = 1; i < (spec.runs ?? 1); i++) {
    const start = performance.now();
    results = await session.run(feeds, names);
    ms.push(performance.now() - start);
  }
  fs.mkdirSync(spec.out, { recursive: true });
  const outputs = {};
  for (const name of names) {
    const tensor = results[name];
    fs.writeFileSync(path.join(spec.out, `${name}.bin`), Buffer.from(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength));
    outputs[name] = { dtype: tensor.type, shape: tensor.dims };
  }
  fs.writeFileSync(path.join(spec.out, 'result.json'),
    JSON.stringify({ runtime, inputNames: session.inputNames, outputs, createMs, ms }));
  await session.release?.();
}
