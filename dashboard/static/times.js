// Keeps "4s ago" words true: every <time data-ago> is recomputed from its datetime, also
// after a run finishes and its page stops polling. The server's clock counts, not the
// browser's: <body data-now> says what time the server rendered the page.
(function () {
  "use strict";
  var serverNow = Date.parse(document.body.getAttribute("data-now"));
  var skew = isNaN(serverNow) ? 0 : Date.now() - serverNow;

  function short(seconds) {
    if (seconds < 10) return seconds.toFixed(2) + "s";
    if (seconds < 60) return seconds.toFixed(1) + "s";
    var minutes = Math.floor(Math.round(seconds) / 60);
    if (minutes < 60) return minutes + "m " + String(Math.round(seconds) % 60).padStart(2, "0") + "s";
    return Math.floor(minutes / 60) + "h " + String(minutes % 60).padStart(2, "0") + "m";
  }

  // The same words as the `ago` filter in dashboard/templatetags/keel.py.
  function ago(moment) {
    var delta = (Date.now() - skew - moment) / 1000;
    if (delta < 0) return "in " + short(-delta);
    if (delta < 60) return Math.floor(delta) + "s ago";
    if (delta < 3600) return Math.floor(delta / 60) + "m ago";
    if (delta < 48 * 3600) return Math.floor(delta / 3600) + "h ago";
    return Math.floor(delta / 86400) + "d ago";
  }

  function refresh() {
    document.querySelectorAll("time[data-ago]").forEach(function (element) {
      var moment = Date.parse(element.getAttribute("datetime"));
      if (!isNaN(moment)) element.textContent = ago(moment);
    });
  }

  setInterval(refresh, 5000);
  document.addEventListener("htmx:afterSettle", refresh);
})();
