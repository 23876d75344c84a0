// Open a study in OHIF (prebuilt @ohif/app) in headless Chromium and report what it shows.
//
// Usage: node probe.cjs JOB.json   (JOB written by tests/integration/ohif/session.py)
// Serves OHIF's dist folder on 127.0.0.1 beside a same-origin proxy to Orthanc's DICOMweb,
// opens the FLAIR on a lesion slice, puts the SEG on it (answering OHIF's "open this
// Segmentation?" with Yes), then reads back from the page: the segmentation OHIF decoded (per
// source SOP instance: indices of segment pixels), the page position of sample points, the
// SR's measurements and the lesion annotations OHIF placed from them, the measurements OHIF
// restores from the SR and the rows of its Measurements panel; screenshots 1-flair.png,
// 2-seg-overlay.png, 3-sr-measurements.png and 3-sr-panel.png (failure.png on error).
// Writes JOB.result_path as JSON. PROBE_DEBUG=1 also keeps OHIF's SR/hydration log lines.
// Every wait has a deadline; a failure is written into the result with the steps so far.
'use strict';

const fs = require('fs');
const http = require('http');
const path = require('path');

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = require(job.playwright_core);

const TYPES = {
  '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.json': 'application/json',
  '.wasm': 'application/wasm', '.svg': 'image/svg+xml', '.ico': 'image/x-icon',
  '.woff2': 'font/woff2', '.png': 'image/png',
};

function appConfig() {
  const source = {
    friendlyName: 'Orthanc (LesionWatch viewer test)',
    name: 'orthanc',
    wadoUriRoot: '/dicom-web',
    qidoRoot: '/dicom-web',
    wadoRoot: '/dicom-web',
    qidoSupportsIncludeField: false,
    imageRendering: 'wadors',
    thumbnailRendering: 'wadors',
    enableStudyLazyLoad: true,
    supportsFuzzyMatching: false, // Orthanc's QIDO rejects fuzzymatching
    supportsWildcard: true,
    staticWado: false,
    omitQuotationForMultipartRequest: true, // Orthanc's multipart parser
    bulkDataURI: { enabled: true, relativeResolution: 'studies' },
  };
  const config = {
    routerBasename: '/',
    extensions: [],
    modes: [],
    customizationService: {},
    showStudyList: true,
    maxNumberOfWebWorkers: 3,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: false,
    showLoadingIndicator: true,
    investigationalUseDialog: { option: 'never' },
    defaultDataSourceName: 'orthanc',
    dataSources: [{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: source,
    }],
  };
  return `window.config = ${JSON.stringify(config)};\n`;
}

function serve(distDir, orthancUrl) {
  const orthanc = new URL(orthancUrl);
  const log = [];
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname.startsWith('/dicom-web/')) {
      const upstream = http.request({
        host: orthanc.hostname, port: orthanc.port, method: req.method,
        path: req.url, headers: { ...req.headers, host: orthanc.host },
      }, (answer) => {
        if (answer.statusCode >= 400) log.push(`${answer.statusCode} ${req.method} ${req.url}`);
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
      });
      upstream.on('error', (err) => { res.writeHead(502); res.end(String(err)); });
      req.pipe(upstream);
      return;
    }
    if (url.pathname === '/app-config.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(appConfig());
      return;
    }
    let file = path.join(distDir, path.normalize(decodeURIComponent(url.pathname)));
    if (!file.startsWith(distDir) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      file = path.join(distDir, 'index.html'); // single-page app: every route is index.html
    }
    res.writeHead(200, { 'content-type': TYPES[path.extname(file)] || 'application/octet-stream' });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve({ server, port: server.address().port, log }));
  });
}

async function until(page, what, fn, arg, timeoutMs) {
  const started = Date.now();
  for (;;) {
    const value = await page.evaluate(fn, arg).catch((err) => ({ __error: String(err) }));
    if (value && !value.__error) return value;
    if (Date.now() - started > timeoutMs) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}: ${JSON.stringify(value)}`);
    }
    await page.waitForTimeout(250);
  }
}

// ---- functions evaluated in the page (OHIF puts services and cornerstone on window) ----

function viewportReady(sopUid) {
  const cs = window.cornerstone;
  const engine = cs && cs.getRenderingEngines && cs.getRenderingEngines()[0];
  const viewport = engine && engine.getViewports()[0];
  if (!viewport || !viewport.getCurrentImageId) return null;
  const imageId = viewport.getCurrentImageId();
  if (!imageId || !imageId.includes(sopUid)) return null;
  return { imageId, viewportId: viewport.id };
}

function displaySetsBySeries() {
  const { displaySetService } = window.services;
  const result = {};
  for (const ds of displaySetService.getActiveDisplaySets()) {
    result[ds.SeriesInstanceUID] = {
      uid: ds.displaySetInstanceUID, modality: ds.Modality, isLoaded: !!ds.isLoaded,
      n: (ds.instances || []).length,
    };
  }
  return Object.keys(result).length >= 3 ? result : null;
}

function jumpTo(sopUid) {
  const viewport = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const index = viewport.getImageIds().findIndex((id) => id.includes(sopUid));
  if (index < 0) return null;
  // null until the viewport shows the slice: OHIF may still move it (e.g. to a segment)
  if (viewport.getCurrentImageIdIndex() !== index) { viewport.setImageIdIndex(index); return null; }
  return { index };
}

function decodedSegmentation() {
  const cs = window.cornerstone;
  const state = window.cornerstoneTools.segmentation.state;
  const all = state.getSegmentations();
  if (!all.length) return null;
  const labelmap = all[0].representationData && all[0].representationData.Labelmap;
  if (!labelmap || !labelmap.imageIds || !labelmap.imageIds.length) return null;
  const slices = {};
  let decoded = 0;
  labelmap.imageIds.forEach((labelmapId, index) => {
    const image = cs.cache.getImage(labelmapId);
    if (!image) return;
    const referenced = image.referencedImageId
      || (labelmap.referencedImageIds && labelmap.referencedImageIds[index]) || '';
    const match = /instances\/([0-9.]+)/.exec(referenced);
    const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
    const on = [];
    for (let i = 0; i < data.length; i++) if (data[i]) on.push(i);
    slices[match ? match[1] : referenced] = on;
    decoded += 1;
  });
  return decoded ? { segmentationId: all[0].segmentationId, slices, n: labelmap.imageIds.length } : null;
}

function canvasPoints(points) {
  const engine = window.cornerstone.getRenderingEngines()[0];
  const viewport = engine.getViewports()[0];
  const rect = viewport.canvas.getBoundingClientRect();
  return {
    rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height },
    points: points.map((p) => {
      const [x, y] = viewport.worldToCanvas(p);
      return [rect.x + x, rect.y + y];
    }),
    imageId: viewport.getCurrentImageId(),
  };
}

function srMeasurements(srSeriesUid) {
  const { displaySetService } = window.services;
  const ds = displaySetService.getActiveDisplaySets().find((d) => d.SeriesInstanceUID === srSeriesUid);
  if (!ds) return null;
  if (!ds.isLoaded) { if (ds.load) ds.load(); return null; }
  const measurements = ds.measurements || [];
  return {
    uid: ds.displaySetInstanceUID,
    count: measurements.length,
    with_coordinates: measurements.filter((m) => (m.coords || []).length).length,
    loaded: measurements.filter((m) => m.loaded).length,
    tracking_identifiers: measurements.map((m) => m.TrackingIdentifier),
  };
}

function srAnnotations() {
  const all = window.cornerstoneTools.annotation.state.getAllAnnotations();
  const sr = all.filter((a) => (a.metadata && a.metadata.toolName || '') === 'DICOMSRDisplay');
  if (!sr.length) return null;
  return sr.map((a) => ({
    tool: a.metadata.toolName,
    frame_of_reference_uid: a.metadata.FrameOfReferenceUID || '',
    labels: (a.data && a.data.labels || []).map((l) => `${l.label}: ${l.value}`),
    points: a.data && a.data.handles && a.data.handles.points || [],
  }));
}

function srMeasurementsInService() {
  const { measurementService } = window.services;
  const all = measurementService.getMeasurements();
  if (!all.length) return null;
  return all.map((m) => ({
    tool: m.toolName,
    label: m.label || '',
    sop_instance_uid: m.SOPInstanceUID || '',
    frame_of_reference_uid: m.FrameOfReferenceUID || '',
    points: m.points || [],
  }));
}

function panelRows() {
  const rows = [...document.querySelectorAll('[data-cy="data-row"]')]
    .filter((row) => row.getClientRects().length);
  if (!rows.length) return null;
  return rows.map((row) => row.innerText.replace(/\s+/g, ' ').trim());
}

// ---- the run ----

async function run() {
  const result = { ok: false, steps: [], console: [], http_errors: [] };
  const { server, port, log } = await serve(path.resolve(job.ohif_dist), job.orthanc_url);
  const base = `http://127.0.0.1:${port}`;
  const browser = await chromium.launch({
    executablePath: job.chromium,
    headless: true,
    args: [
      '--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
      '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync',
    ],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  // A radiologist who has seen the onboarding tour once: no tour popup over the image.
  await page.addInitScript(() => localStorage.setItem('shownTours', '["basicViewerTour"]'));
  page.on('console', (msg) => {
    if (['error', 'warning'].includes(msg.type()) || (process.env.PROBE_DEBUG && /SR|hydrat|===|Measurement|tool state/i.test(msg.text()))) result.console.push(`${msg.type()}: ${msg.text()}`.slice(0, 500));
  });
  const step = (name) => { result.steps.push(`${((Date.now() - t0) / 1000).toFixed(1)}s ${name}`); };
  const t0 = Date.now();
  try {
    const query = new URLSearchParams({
      StudyInstanceUIDs: job.study_uid,
      initialSeriesInstanceUID: job.flair_series_uid,
      initialSOPInstanceUID: job.lesion_sop_uid,
    });
    await page.goto(`${base}/viewer?${query}`, { waitUntil: 'domcontentloaded' });
    step('opened viewer');
    const ready = await until(page, 'the FLAIR on the lesion slice', viewportReady, job.lesion_sop_uid, 90000);
    step(`FLAIR shown: ${ready.imageId}`);
    const sets = await until(page, 'display sets', displaySetsBySeries, null, 30000);
    result.display_sets = sets;
    await page.waitForTimeout(1500);
    await page.screenshot({ path: path.join(job.out_dir, '1-flair.png') });
    const seg = sets[job.seg_series_uid];
    if (!seg) throw new Error(`no SEG display set; display sets: ${JSON.stringify(sets)}`);
    await page.evaluate(({ viewportId, uid }) => window.commandsManager.runCommand(
      'loadSegmentationDisplaySetsForViewport', { viewportId, displaySetInstanceUIDs: [uid] }),
    { viewportId: ready.viewportId, uid: seg.uid });
    step('SEG requested');
    // OHIF previews the SEG and asks "Do you want to open this Segmentation?": answer Yes.
    const yes = page.getByRole('button', { name: 'Yes', exact: true });
    await yes.click({ timeout: job.seg_timeout_ms || 60000 })
      .then(() => step('hydration prompt answered'))
      .catch((err) => step(`no hydration prompt: ${String(err).split('\n')[0]}`));
    const decoded = await until(page, 'the decoded SEG', decodedSegmentation, null, job.seg_timeout_ms || 60000);
    step(`SEG decoded: ${Object.keys(decoded.slices).length} slices`);
    result.segmentation = decoded;
    for (let settled = 0; settled < 2; settled++) { // twice: OHIF may jump after our first
      await until(page, 'a jump to the lesion slice', jumpTo, job.lesion_sop_uid, 30000);
      await until(page, 'the lesion slice again', viewportReady, job.lesion_sop_uid, 30000);
      await page.waitForTimeout(2500); // let the labelmap draw
    }
    const screen = await page.evaluate(canvasPoints, job.sample_points_lps);
    result.samples = screen;
    await page.screenshot({ path: path.join(job.out_dir, '2-seg-overlay.png') });
    step('overlay screenshot');
    const sr = await until(page, 'the SR display set', srMeasurements, job.sr_series_uid, 30000);
    result.sr = sr;
    step(`SR: ${sr.count} measurement groups, ${sr.with_coordinates} with coordinates`);
    // OHIF places each lesion's SCOORD3D on the display set of its frame of reference.
    result.sr_annotations = await until(page, 'SR annotations', srAnnotations, null, 30000)
      .catch(() => []);
    step(`SR annotations: ${result.sr_annotations.length}`);
    // Restore the report's measurements, as OHIF's SR "restore measurements" path does
    // (TrackedMeasurementsContext event HYDRATE_SR -> hydrateStructuredReport): each
    // lesion's 1-point "Image Region" becomes a Probe measurement in the Measurements panel.
    // Not by opening the SR in the viewport: OHIF 3.13.2 then crashes in
    // _checkIfCanAddMeasurementsToDisplaySet on the summary groups, which have no
    // coordinates (measurement.coords[0].ReferencedSOPSequence; the route's error boundary
    // leaves a black viewport).
    result.sr_state = await page.evaluate((uid) => {
      const ds = window.services.displaySetService.getDisplaySetByUID(uid);
      return { isLoaded: !!ds.isLoaded, isRehydratable: !!ds.isRehydratable, isHydrated: !!ds.isHydrated };
    }, sr.uid);
    step(`SR display set: ${JSON.stringify(result.sr_state)}`);
    await page.evaluate(({ viewportId, uid, series }) => window.commandsManager.runCommand(
      'loadTrackedSRMeasurements', { displaySetInstanceUID: uid, SeriesInstanceUID: series, viewportId }),
    { viewportId: ready.viewportId, uid: sr.uid, series: job.sr_series_uid });
    const prompt = page.locator('[data-cy="yes-hydrate"]').first();
    await prompt.click({ timeout: 3000 }).then(() => step('SR hydration prompt answered'))
      .catch(() => step('no SR hydration prompt'));
    result.sr_measurements = await until(page, 'measurements from the SR', srMeasurementsInService, null, 30000);
    step(`measurement service: ${result.sr_measurements.length} measurements`);
    // the right side panel: its tab of tracked measurements (data-cy "<panel name>-btn")
    const tab = page.locator('[data-cy="trackedMeasurements-btn"]').first();
    if (!(await page.evaluate(panelRows))) {
      await tab.click({ timeout: 5000 }).then(() => step('Measurements panel opened'))
        .catch((err) => step(`no Measurements tab: ${String(err).split('\n')[0]}`));
    }
    result.panel_rows = await until(page, 'the Measurements panel rows', panelRows, null, 20000);
    step(`Measurements panel: ${result.panel_rows.length} rows`);
    await page.waitForTimeout(2000);
    await page.screenshot({ path: path.join(job.out_dir, '3-sr-measurements.png') });
    const box = await page.locator('[data-cy="data-row"]').first().boundingBox();
    const viewportSize = page.viewportSize();
    if (box) {
      const x = Math.max(0, Math.floor(box.x) - 8);
      await page.screenshot({
        path: path.join(job.out_dir, '3-sr-panel.png'),
        clip: { x, y: 48, width: viewportSize.width - x, height: viewportSize.height - 48 },
      });
    }
    step('SR screenshots');
    result.ok = true;
  } catch (err) {
    result.error = String(err && err.stack || err);
    await page.screenshot({ path: path.join(job.out_dir, 'failure.png') }).catch(() => {});
    result.viewports_at_failure = await page.evaluate(() => {
      const { viewportGridService, displaySetService } = window.services;
      return [...viewportGridService.getState().viewports.values()].map((v) => ({
        id: v.viewportId,
        series: (v.displaySetInstanceUIDs || []).map((uid) => {
          const ds = displaySetService.getDisplaySetByUID(uid);
          return ds ? `${ds.Modality} ${ds.SeriesDescription}` : uid;
        }),
      }));
    }).catch((err) => String(err));
  } finally {
    result.http_errors = log.slice(0, 50);
    fs.writeFileSync(job.result_path, JSON.stringify(result));
    await browser.close();
    server.close();
  }
}

run().catch((err) => { console.error(err); process.exit(2); });
