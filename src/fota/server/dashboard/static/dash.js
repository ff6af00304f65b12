// fota dashboard: confirmations before state changes, and live sections from server-sent events.
// Hand-written, no dependencies. The server renders everything; this only swaps sections in.
"use strict";

// Every form with data-confirm asks first (pause, resume, abort, approve, cancel).
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute && form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

// Live sections: the server sends {"element id": "html"} for the sections that changed.
(function () {
  var url = document.body.getAttribute("data-events");
  if (!url || !window.EventSource) {
    return;
  }
  var source = new EventSource(url);
  source.addEventListener("fragments", function (event) {
    var fragments = JSON.parse(event.data);
    Object.keys(fragments).forEach(function (id) {
      var section = document.getElementById(id);
      if (section) {
        section.innerHTML = fragments[id];
      }
    });
    document.body.setAttribute("data-updated", String(Date.now()));
  });
  // The session ended (signed out, signed in again elsewhere, token revoked or expired): stop
  // updating and say so; the page's forms are stale now (their CSRF token is refused).
  source.addEventListener("signout", function () {
    source.close();
    var note = document.createElement("p");
    note.className = "error banner";
    note.setAttribute("role", "alert");
    note.textContent = "This session ended: the page no longer updates. Reload to sign in again.";
    document.querySelector("main").prepend(note);
  });
})();
