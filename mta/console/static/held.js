// Held mail: the "select all" box of the list. A static file (the CSP allows no inline
// script); without it every box is still ticked one by one.
"use strict";
(function () {
  const all = document.getElementById("select-all");
  if (!all) {
    return;
  }
  all.addEventListener("change", function () {
    for (const box of document.querySelectorAll('#held input[name="ids"]')) {
      box.checked = all.checked;
    }
  });
}());
