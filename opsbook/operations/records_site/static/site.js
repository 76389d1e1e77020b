// opsbook records site: filter and sort the records table. The rows are in the page already
// (it reads without this script); this only hides and reorders them.
(function () {
  "use strict";
  const table = document.querySelector("table.records");
  if (!table) {
    return;
  }
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const selects = Array.from(document.querySelectorAll("select[data-filter]"));
  const shown = document.querySelector(".filters .shown");

  function apply() {
    const want = {};
    selects.forEach(function (s) {
      if (s.value) {
        want[s.dataset.filter] = s.value;
      }
    });
    let n = 0;
    rows.forEach(function (r) {
      const match = Object.keys(want).every(function (k) { return r.dataset[k] === want[k]; });
      r.hidden = !match;
      if (match) {
        n += 1;
      }
    });
    if (shown) {
      shown.textContent = String(n);
    }
    const hash = new URLSearchParams(want).toString();
    if (hash !== location.hash.slice(1)) {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    }
  }

  // A filter can come in the address (index.html#outcome=failed), so a link can show a subset.
  const given = new URLSearchParams(location.hash.slice(1));
  selects.forEach(function (s) {
    const v = given.get(s.dataset.filter);
    if (v !== null && Array.from(s.options).some(function (o) { return o.value === v; })) {
      s.value = v;
    }
    s.addEventListener("change", apply);
  });
  apply();

  function key(row, column, numeric) {
    const cell = row.cells[column];
    const raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
    if (!numeric) {
      return raw;
    }
    return raw === "" ? -Infinity : Number(raw);
  }

  table.querySelectorAll("th[data-sort]").forEach(function (th) {
    th.querySelector("button").addEventListener("click", function () {
      const column = th.cellIndex;
      const numeric = th.dataset.sort === "number";
      const direction = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      table.querySelectorAll("th[aria-sort]").forEach(function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", direction === 1 ? "ascending" : "descending");
      const sorted = rows.slice().sort(function (a, b) {
        const x = key(a, column, numeric);
        const y = key(b, column, numeric);
        return (x < y ? -1 : x > y ? 1 : 0) * direction;
      });
      const fragment = document.createDocumentFragment();
      sorted.forEach(function (r) { fragment.appendChild(r); });
      body.appendChild(fragment);
    });
  });
})();
