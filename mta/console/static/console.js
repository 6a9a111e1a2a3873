// The console's script: a static file, the only kind the Content-Security-Policy allows.
// It marks the page as scripted (tests check that this one runs and an inline one does not).
"use strict";
document.documentElement.dataset.script = "loaded";
