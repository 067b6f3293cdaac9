// The node panel's live log tail follows its newest line, like `tail -f`, unless the
// reader has scrolled up to read. htmx appends the lines (templates/dashboard/_log_tail.html);
// this only scrolls. No attribute is touched: htmx would re-initialise the element.
(function () {
  "use strict";
  if (window.keelLogTail) return;
  window.keelLogTail = true;

  const following = new WeakMap();
  const seen = new WeakSet();

  function isTail(element) {
    return element instanceof Element && element.classList.contains("log-live");
  }

  function atBottom(box) {
    return box.scrollHeight - box.scrollTop - box.clientHeight < 24;
  }

  function toBottomOnce(root) {
    const boxes = isTail(root) ? [root] : root.querySelectorAll(".log-live");
    for (const box of boxes) {
      if (!seen.has(box)) {
        seen.add(box);
        box.scrollTop = box.scrollHeight;
      }
    }
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    const box = event.detail.target;
    if (isTail(box)) following.set(box, atBottom(box));
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    const box = event.detail.target;
    if (isTail(box) && following.get(box)) box.scrollTop = box.scrollHeight;
  });
  // A tail that arrives with the run page's refresh (a new attempt) starts at its end.
  document.addEventListener("htmx:load", function (event) {
    if (event.target instanceof Element) toBottomOnce(event.target);
  });
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () {
      toBottomOnce(document);
    });
  } else {
    toBottomOnce(document);
  }
})();
