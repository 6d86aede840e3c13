// The page of `agf-onnx web`: explains an image with the compiled model in onnxruntime-web (WebGPU where the
// browser has it, else WASM). Preprocessing is explain's (agf.json holds its Preprocessing, field for field).
// Contract: index.html?image=URL&class=K; window.agf.ready (a Promise); window.agf.result =
// {heatmap: Float32Array [H·W], shape: [H, W], target, predicted, probabilities: Float32Array, backend, method}.
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
let settle;
const agf = { result: null, backend: null, ready: new Promise((resolve, reject) => { settle = { resolve, reject }; }) };
agf.ready.catch(() => {});  // a failure is shown on the page; the promise still rejects for whoever awaits it
window.agf = agf;

function say(text, error = false) {
  $('status').textContent = text;
  $('status').className = error ? 'error' : '';
}

async function webgpuAdapter() {
  try { return Boolean(navigator.gpu && await navigator.gpu.requestAdapter()); } catch { return false; }
}

async function load(config) {
  const gpu = params.get('backend') !== 'wasm' && await webgpuAdapter();
  const ort = await import(gpu ? './ort/ort.webgpu.min.mjs' : './ort/ort.wasm.min.mjs');
  ort.env.wasm.wasmPaths = new URL('./ort/', location.href).href;
  // several threads need cross-origin isolation (SharedArrayBuffer): `agf-onnx web --serve` sends its headers
  const threads = Number(params.get('threads')) ||
    (self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
  ort.env.wasm.numThreads = threads;
  const model = await (await fetch(config.model)).arrayBuffer();
  if (gpu) {
    try {
      return { ort, backend: 'webgpu', session: await ort.InferenceSession.create(model, { executionProviders: ['webgpu'] }) };
    } catch (error) {
      console.warn('WebGPU session failed, using WASM:', error);
    }
  }
  const session = await ort.InferenceSession.create(model, { executionProviders: ['wasm'] });
  return { ort, backend: `wasm (${threads} thread${threads > 1 ? 's' : ''})`, session };
}

// explain's Preprocessing.fit: resize to the model's size, or (crop) cover it keeping the aspect ratio and
// centre-crop; an image already at the model's size is copied pixel for pixel
function fit(config, bitmap) {
  const { width: W, height: H } = config;
  const canvas = document.createElement('canvas');
  canvas.width = W;
  canvas.height = H;
  const context = canvas.getContext('2d', { willReadFrequently: true });
  if (config.crop) {
    const scale = config.size ? config.size / Math.min(bitmap.width, bitmap.height)
      : Math.max(W / bitmap.width, H / bitmap.height);
    const width = Math.max(W, Math.round(bitmap.width * scale)), height = Math.max(H, Math.round(bitmap.height * scale));
    context.drawImage(bitmap, -Math.floor((width - W) / 2), -Math.floor((height - H) / 2), width, height);
  } else {
    context.drawImage(bitmap, 0, 0, W, H);
  }
  return context.getImageData(0, 0, W, H);
}

// explain's Preprocessing.to_tensor: channel order, (pixels/255 − mean)/std in double rounded to float32, layout
function toTensor(ort, config, pixels) {
  const n = config.width * config.height, order = config.bgr ? [2, 1, 0] : [0, 1, 2];
  const values = config.integer_input ? new Uint8Array(3 * n) : new Float32Array(3 * n);
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < 3; c++) {
      const v = pixels.data[4 * i + order[c]];
      values[config.channels_last ? 3 * i + c : c * n + i] =
        config.integer_input || config.mean === null ? v : (v / 255 - config.mean[c]) / config.std[c];
    }
  }
  const shape = config.channels_last ? [1, config.height, config.width, 3] : [1, 3, config.height, config.width];
  return new ort.Tensor(config.integer_input ? 'uint8' : 'float32', values, shape);
}

function probabilitiesOf(scores) {
  const sum = scores.reduce((a, b) => a + b, 0);
  if (scores.every((s) => s >= 0) && Math.abs(sum - 1) < 1e-3) return Float32Array.from(scores);
  const top = Math.max(...scores), e = scores.map((s) => Math.exp(s - top)), total = e.reduce((a, b) => a + b, 0);
  return Float32Array.from(e, (v) => v / total);
}

// explain's diverging colour map: white at 0, red (204, 0, 0) at +1, blue (0, 51, 204) at −1
function diverging(value) {
  const v = Math.max(-1, Math.min(1, value));
  return v >= 0 ? [255 - v * 51, 255 - v * 255, 255 - v * 255] : [255 + v * 255, 255 + v * 204, 255 + v * 51];
}

function drawBar() {
  const bar = $('bar'), context = bar.getContext('2d');
  for (let x = 0; x < bar.width; x++) {
    context.fillStyle = `rgb(${diverging((2 * x) / (bar.width - 1) - 1).map(Math.round).join(',')})`;
    context.fillRect(x, 0, 1, bar.height);
  }
}

// explain's blend: the map over the photo, its weight 0.7·|value|
function render(config, pixels, heatmap) {
  const view = $('view');
  view.width = config.width;
  view.height = config.height;
  const image = new ImageData(config.width, config.height);
  for (let i = 0; i < heatmap.length; i++) {
    const weight = Math.min(1, Math.abs(heatmap[i])) * 0.7, colour = diverging(heatmap[i]);
    for (let c = 0; c < 3; c++) {
      image.data[4 * i + c] = Math.round((1 - weight) * pixels.data[4 * i + c] + weight * Math.round(colour[c]));
    }
    image.data[4 * i + 3] = 255;
  }
  view.getContext('2d').putImageData(image, 0, 0);
}

async function main() {
  const config = await (await fetch('agf.json')).json();
  const { ort, backend, session } = await load(config);
  agf.backend = backend;
  const label = (k) => (config.labels ? `${config.labels[k]} (${k})` : `class ${k}`);
  say(`${config.method} on ${backend}: pick, drop or photograph an image`);
  drawBar();
  let pixels = null, queue = Promise.resolve();

  async function explain(chosen) {  // chosen: a class index, or −1 for the top class
    const began = performance.now();
    const feeds = { [config.image_input]: toTensor(ort, config, pixels),
      [config.target]: new ort.Tensor('int64', BigInt64Array.from([BigInt(chosen)]), [1]) };
    const outputs = await session.run(feeds, [config.heatmap, ...(config.scores ? [config.scores] : [])]);
    const heatmap = Float32Array.from(outputs[config.heatmap].data);
    const probabilities = config.scores ? probabilitiesOf(Array.from(outputs[config.scores].data)) : null;
    const predicted = probabilities ? probabilities.indexOf(Math.max(...probabilities)) : -1;
    const target = chosen >= 0 ? chosen : predicted;
    render(config, pixels, heatmap);
    $('title').textContent = `${config.method} · ${label(target)}${target === predicted ? ' (predicted)' : ''}`;
    showClasses(probabilities, target);
    say(`${config.method} on ${backend}: ${(performance.now() - began).toFixed(0)} ms`);
    agf.result = { heatmap, shape: [config.height, config.width], target, predicted, probabilities, backend,
      method: config.method };
    return agf.result;
  }

  function showClasses(probabilities, target) {
    const count = probabilities ? probabilities.length : config.classes || 0;
    const picker = $('picker');
    if (picker.options.length !== count) {
      picker.replaceChildren(...Array.from({ length: count }, (_, k) => new Option(label(k), k)));
    }
    picker.value = String(target);
    if (!probabilities) return;
    const best = Array.from(probabilities.keys()).sort((a, b) => probabilities[b] - probabilities[a]).slice(0, config.top_k);
    $('top').tBodies[0].replaceChildren(...best.map((k) => {
      const row = document.createElement('tr');
      row.className = `top${k === target ? ' chosen' : ''}`;
      row.dataset.class = k;
      row.innerHTML = `<td></td><td>${(100 * probabilities[k]).toFixed(2)} %</td>`;
      row.cells[0].textContent = label(k);
      row.onclick = () => agf.explain(k);
      return row;
    }));
  }

  // one run at a time, in the order asked
  agf.explain = (chosen = -1) => (queue = queue.then(() => explain(Number(chosen))).catch((error) => {
    say(`error: ${error.message || error}`, true);
    throw error;
  }));
  agf.explainImage = async (source, chosen = -1) => {
    const bitmap = await createImageBitmap(source, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
    pixels = fit(config, bitmap);
    return agf.explain(chosen);
  };
  $('picker').onchange = (event) => agf.explain(event.target.value);
  $('file').onchange = (event) => event.target.files[0] && agf.explainImage(event.target.files[0]);
  const drop = $('drop');
  drop.ondragover = (event) => { event.preventDefault(); drop.classList.add('over'); };
  drop.ondragleave = () => drop.classList.remove('over');
  drop.ondrop = (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    if (event.dataTransfer.files[0]) agf.explainImage(event.dataTransfer.files[0]);
  };
  $('camera').onclick = async () => {
    const video = $('video');
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
    video.style.display = 'block';
    $('snap').hidden = false;
  };
  $('snap').onclick = () => agf.explainImage($('video'));

  const image = params.get('image');
  if (image) {
    const response = await fetch(image);
    if (!response.ok) throw new Error(`image ${image}: HTTP ${response.status}`);
    await agf.explainImage(await response.blob(), params.get('class') ?? -1);
  }
}

main().then(() => settle.resolve(agf), (error) => {
  say(`error: ${error.message || error}`, true);
  settle.reject(error);
});
