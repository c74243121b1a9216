// The dashboard's only script: it hands the operator token to the forms that change something, asks before a
// cancel, and reloads the list of backfills every few seconds. Nothing is loaded from elsewhere.
"use strict";
(() => {
  const KEY = "backfill-serve-token";

  function refreshEvery(main) {
    const every = Number(main.dataset.refreshMs);
    if (!(every > 0)) return;
    setInterval(async () => {
      // Leave the list alone while the operator is using a control in it.
      if (main.contains(document.activeElement)) return;
      try {
        const response = await fetch("backfills", { headers: { Accept: "text/html" } });
        main.innerHTML = await response.text();
      } catch (error) {
        // The server is gone for a moment: the next tick tries again.
      }
    }, every);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const input = document.getElementById("token");
    if (input) {
      input.value = sessionStorage.getItem(KEY) || "";
      input.addEventListener("input", () => sessionStorage.setItem(KEY, input.value));
    }
    // The page an action answered with shows its outcome; a reload must not post the action again.
    if (!location.pathname.endsWith("/")) history.replaceState(null, "", "./");
    refreshEvery(document.getElementById("backfills"));
  });

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!form.elements.token) return;
    const action = form.elements.action ? form.elements.action.value : "";
    if (action === "cancel" && !confirm(`Cancel ${form.elements.backfill.value} for good?`)) {
      event.preventDefault();
      return;
    }
    const input = document.getElementById("token");
    form.elements.token.value = input ? input.value : "";
  });
})();
