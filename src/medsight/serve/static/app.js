"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let authRequired = false;
  let model = null; // /v1/model
  let clinicalColumns = [];
  let current = 0; // id of the latest upload: answers to older uploads are dropped

  function headers() {
    const h = {};
    const key = $("api-key").value.trim();
    if (key) h["X-API-Key"] = key;
    return h;
  }

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  async function loadModel() {
    try {
      const health = await (await fetch("/healthz")).json();
      authRequired = !!health.auth_required;
      $("key-row").hidden = !authRequired;
      if (authRequired && !$("api-key").value) {
        $("model-info").textContent = "this server needs an API key";
        return;
      }
      const r = await fetch("/v1/model", { headers: headers() });
      if (!r.ok) {
        $("model-info").textContent = "model info: " + r.status + " " + ((await r.json()).detail || "");
        return;
      }
      const m = await r.json();
      model = m;
      clinicalColumns = m.clinical_columns || [];
      const box = $("clinical");
      box.textContent = "";
      for (const c of clinicalColumns) {
        const label = document.createElement("label");
        label.textContent = c + " ";
        const input = document.createElement("input");
        input.dataset.column = c;
        input.placeholder = "value";
        label.appendChild(input);
        box.appendChild(label);
      }
      box.hidden = clinicalColumns.length === 0;
      $("model-info").textContent = m.name + " · " + m.task + " · classes: " + m.classes.map((c) => "\u201c" + c + "\u201d").join(", ") +
        " · threshold " + (m.threshold === null ? "default" : m.threshold_display) +
        " · " + m.model_version;
      const near = m.task === "binary" || m.task === "multilabel"
        ? "a probability is too close to its threshold to call"
        : "the two most likely classes are too close to call";
      $("rule").textContent = "A result is shown as \u201cnot reliable: needs review\u201d instead of a prediction when " +
        (m.ood_threshold !== null && m.ood_threshold !== undefined ? "the scan does not look like the training data " +
          "(out-of-distribution score above " + m.ood_threshold.toFixed(1) + "; then no class is given) or when " : "") +
        near + " (" + m.review.description + ").";
    } catch (e) {
      $("model-info").textContent = "cannot reach the server";
    }
  }

  // Forget everything about the previous result: nothing stale may stay on screen.
  function clearResult() {
    $("result").hidden = true;
    delete $("result").dataset.file;
    delete $("result").dataset.review;
    $("verdict").hidden = true;
    $("review").hidden = true;
    $("pred-class").textContent = "";
    $("review-reasons").textContent = "";
    $("positive").textContent = "";
    $("pred-meta").textContent = "";
    $("image-note").textContent = "";
    $("probs").textContent = "";
    for (const id of ["image", "heatmap", "colorbar"]) $(id).removeAttribute("src");
  }

  function fmt(p) { return p.toFixed(4); }
  // thresholds as displayed everywhere: 3 significant digits (the API carries the exact value)
  function sig3(x) { return String(parseFloat(Number(x).toPrecision(3))); }

  function showResult(res) {
    const review = res.review === true || res.ood_flag === true;
    const reasons = res.review_reasons || [];
    if (res.ood_flag === true && reasons.length === 0) reasons.push("the scan does not look like the training data");
    const predicted = res.predicted === null || res.predicted === undefined ? "no verdict"
      : (Array.isArray(res.predicted) ? (res.predicted.join(", ") || "none") : res.predicted);
    $("result").dataset.review = String(review);
    $("result").dataset.predicted = predicted;
    if (review) {
      const ul = $("review-reasons");
      for (const why of reasons) {
        const li = document.createElement("li");
        li.textContent = why;
        ul.appendChild(li);
      }
      $("review").hidden = false;
    } else {
      $("pred-class").textContent = predicted;
      $("verdict").hidden = false;
    }
    const names = Object.keys(res.probabilities);
    if (names.length === 2 && !Array.isArray(res.predicted)) {
      // binary: name the positive class (from the API, else the model's class list) and its probability
      const pos = res.positive_class || (model && model.classes && model.classes[1]) || names[1];
      $("positive").textContent = "Probability of \u201c" + pos + "\u201d: " + fmt(res.probabilities[pos]) +
        " (threshold " + (typeof res.threshold === "number" ? sig3(res.threshold) : JSON.stringify(res.threshold)) + ")";
    }
    $("pred-meta").textContent = (review ? "model output: " + predicted + " · " : "") +
      (res.calibrated ? "calibrated (T=" + res.temperature.toFixed(3) + ")" : "uncalibrated") +
      (res.ood_score !== null && res.ood_score !== undefined ? " · OOD score " + res.ood_score.toFixed(1) : "") +
      " · " + res.model_version;
    const probs = $("probs");
    for (const [name, p] of Object.entries(res.probabilities)) {
      const row = document.createElement("div");
      row.className = "prob-row";
      row.dataset.class = name;
      row.dataset.prob = String(p);
      const label = document.createElement("span");
      label.className = "prob-label";
      label.textContent = name;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = (100 * p).toFixed(1) + "%";
      bar.appendChild(fill);
      const text = document.createElement("span");
      text.className = "prob-text";
      text.textContent = fmt(p);
      row.append(label, bar, text);
      probs.appendChild(row);
    }
    const image = res.display_png || res.image_png;
    const heat = res.display_heatmap_png || res.colormap_png;
    if (image) $("image").src = "data:image/png;base64," + image;
    if (heat) $("heatmap").src = "data:image/png;base64," + heat;
    $("heatmap").hidden = !heat;
    if (res.colorbar_png) $("colorbar").src = "data:image/png;base64," + res.colorbar_png;
    $("colorbar-box").hidden = !res.colorbar_png;
    if (res.display_size && model) {
      const own = res.display_size.join("\u00d7"), input = model.input.size.join("\u00d7");
      $("image-note").textContent = "shown at its own " + own + " px, windowed as for the model; " +
        (own === input ? "the model sees it at this size" : "the model sees it resized to " + input);
    }
    $("result").hidden = false;
  }

  async function predict(file) {
    if (!file) return;
    const id = ++current;
    clearResult();
    setStatus("predicting " + file.name + " …", false);
    $("result").dataset.state = "busy";
    const form = new FormData();
    form.append("file", file, file.name);
    if (clinicalColumns.length) {
      const values = {};
      for (const input of document.querySelectorAll("#clinical input")) values[input.dataset.column] = input.value;
      form.append("clinical", JSON.stringify(values));
    }
    try {
      const r = await fetch("/v1/predict?explain=true", { method: "POST", body: form, headers: headers() });
      const body = await r.json().catch(() => ({ detail: "unreadable response" }));
      if (id !== current) return;
      if (!r.ok) {
        if (r.status === 401) $("key-row").hidden = false;
        clearResult();
        setStatus(file.name + ": error " + r.status + ": " + body.detail, true);
        $("result").dataset.state = "error";
        return;
      }
      showResult(body);
      setStatus(file.name + ": done" + (body.review ? " (needs review)" : ""), false);
      $("result").dataset.state = "done";
      $("result").dataset.file = file.name;
    } catch (e) {
      if (id !== current) return;
      clearResult();
      setStatus("request failed: " + e, true);
      $("result").dataset.state = "error";
    }
  }

  // Space opens a focused file input natively; Enter should too (keyboard users press Enter on a "button")
  $("file").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); e.target.click(); }
  });
  $("file").addEventListener("change", (e) => { predict(e.target.files[0]); e.target.value = ""; });
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => predict(e.dataTransfer.files[0]));
  $("opacity").addEventListener("input", (e) => {
    $("heatmap").style.opacity = e.target.value / 100;
    $("opacity-value").textContent = e.target.value + "%";
  });
  $("api-key").addEventListener("change", loadModel);
  $("heatmap").style.opacity = 0.45;
  clearResult();
  loadModel();
})();
