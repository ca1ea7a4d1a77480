// The VM page's graphical console: noVNC (an ES module, no build step) on the
// console server's websocket /vms/NAME/vnc, which the server joins to the
// agent's VNC relay with the admin certificate. No inline script, no eval.
import RFB from "/static/vendor/novnc/core/rfb.js";

const screen = document.getElementById("vnc-screen");
const status = document.getElementById("vnc-status");

function say(text, state) {
  status.textContent = text;
  screen.dataset.state = state;
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = scheme + "//" + location.host + screen.dataset.src;
  say("Connecting...", "connecting");
  const rfb = new RFB(screen, url, { shared: true });
  rfb.scaleViewport = true;
  rfb.background = "#111";
  rfb.addEventListener("connect", () => say("Connected.", "connected"));
  rfb.addEventListener("disconnect", (event) => {
    say(event.detail.clean ? "Disconnected." : "The display closed or could not be reached.",
        "disconnected");
    document.getElementById("vnc-reconnect").hidden = false;
  });
  rfb.addEventListener("securityfailure", (event) =>
    say("Refused: " + (event.detail.reason || "security failure"), "disconnected"));
  return rfb;
}

if (screen) {
  connect();
  document.getElementById("vnc-reconnect").addEventListener("click", (event) => {
    event.target.hidden = true;
    screen.replaceChildren();
    connect();
  });
}
