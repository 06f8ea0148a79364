// esource dashboard: progressive enhancement only (every page works without JavaScript).
(function () {
  "use strict";
  document.documentElement.classList.add("js");
  document.addEventListener("DOMContentLoaded", function () {
    // "select all" in the reconciliation queue
    var all = document.getElementById("select-all");
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll("input.row-select").forEach(function (box) { box.checked = all.checked; });
      });
    }
    // the bulk form's value field matters for "override" only
    var action = document.querySelector("select.js-action");
    var valueBox = document.querySelector(".js-value");
    if (action && valueBox) {
      var sync = function () { valueBox.hidden = action.value !== "override"; };
      action.addEventListener("change", sync);
      sync();
    }
    // a cell opened from the grid: move the keyboard focus to its heading
    if (window.location.hash === "#cell") {
      var cell = document.getElementById("cell");
      if (cell) { cell.focus(); }
    }
  });
})();
