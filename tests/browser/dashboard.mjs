// The dashboard in a real browser (Debian's chromium, driven by playwright-core) against
// a real cluster that tests/dashboard.rs started: log in, every card, a service restarted
// from its card, a workflow `kill -9`ed from the shell and seen live, a task submitted and
// cancelled, a POST without the CSRF token refused, the keyboard alone, a phone's width.
// Prints one line per check ("ok: ..." / "FAIL: ..."), screenshots into NEXUS_SHOTS, and
// exits non-zero on the first failure.
//
//   NEXUS_URL=http://127.0.0.1:PORT NEXUS_KEY=nxk_... NEXUS_SHOTS=DIR node dashboard.mjs

import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const url = process.env.NEXUS_URL;
const key = process.env.NEXUS_KEY;
const shots = process.env.NEXUS_SHOTS || "dashboard-shots";
const exe = process.env.CHROMIUM || "/usr/bin/chromium";
mkdirSync(shots, { recursive: true });

const ok = (m) => console.log(`ok: ${m}`);
let browser;
async function fail(m) {
  console.log(`FAIL: ${m}`);
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}

browser = await chromium.launch({
  executablePath: exe,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
const page = await context.newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
// The refusals this test provokes (401, 403) are logged by the browser as failed loads.
page.on("console", (m) => { if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) errors.push(m.text()); });
// Every request the page makes must go to this server: nothing from elsewhere.
const foreign = [];
page.on("request", (r) => { if (!r.url().startsWith(url) && !r.url().startsWith("data:")) foreign.push(r.url()); });

const t0 = Date.now();
await page.goto(`${url}/`);
await page.waitForSelector("#login:not(.hidden)", { timeout: 10000 }).catch(() => fail("no login form"));
ok("the login form shows without a session");
await page.fill("#key", "nxk_" + "0".repeat(64));
await page.click("#login button[type=submit]");
await page.waitForFunction(() => document.querySelector("#login-err").textContent.length > 0, null, { timeout: 5000 })
  .catch(() => fail("a wrong key gave no error"));
ok(`a wrong key is refused: "${await page.textContent("#login-err")}"`);
await page.fill("#key", key);
await page.click("#login button[type=submit]");
await page.waitForFunction(() => document.querySelector("#banner").textContent === "HEALTHY", null, { timeout: 15000 })
  .catch(async () => fail(`the banner never said HEALTHY: ${await page.textContent("#banner")}`));
ok(`logged in; banner HEALTHY ${Date.now() - t0} ms after the page was asked for`);
const cookies = await context.cookies();
const session = cookies.find((c) => c.name === "nexus_session");
if (!session || !session.httpOnly || session.sameSite !== "Strict") await fail(`the session cookie: ${JSON.stringify(session)}`);
if (await page.evaluate(() => document.cookie.includes("nexus_session"))) await fail("the page's script can read the session cookie");
ok("the session cookie is HttpOnly and SameSite=Strict, out of the script's reach");
await page.evaluate(() => { window.__sameDocument = true; });

// Every daemon and every service instance has its card.
const status = await page.evaluate(async () => (await fetch("/api/v1/status")).json());
for (const d of status.daemons) {
  if (!(await page.$(`#card-${d.role}-${d.id}`))) await fail(`no card for ${d.role}-${d.id}`);
}
for (const s of status.services) {
  if (!(await page.$(`#card-svc-${s.name}-${s.instance}`))) await fail(`no card for ${s.name}-${s.instance}`);
}
ok(`a card for each of ${status.daemons.length} daemons and ${status.services.length} service instances`);
await page.waitForTimeout(2500); // a few status frames, so the sparklines have points
await page.screenshot({ path: `${shots}/1-overview.png`, fullPage: true });

const pidIn = (sel) => page.$eval(`${sel} .pid`, (e) => Number(e.textContent));

// Restart a service from its card: confirmation, then a new pid on the card.
const web = `#card-svc-${status.services[0].name}-${status.services[0].instance}`;
const oldWeb = await pidIn(web);
await page.click(`${web} [data-action=restart]`);
await page.waitForSelector("#confirm[open]", { timeout: 3000 }).catch(() => fail("no confirmation dialog"));
await page.screenshot({ path: `${shots}/2-confirm.png` });
await page.click("#confirm-yes");
await page.waitForFunction(([sel, old]) => { const e = document.querySelector(`${sel} .pid`); return e && Number(e.textContent) !== old && Number(e.textContent) > 0; },
  [web, oldWeb], { timeout: 10000 }).catch(() => fail(`${web}: pid ${oldWeb} never changed after restart`));
ok(`restart from the card: ${web} pid ${oldWeb} -> ${await pidIn(web)}`);

// kill -9 from the shell: the card and the event list change, no reload.
const victim = await pidIn("#card-workflow-3");
const killedAt = Date.now();
execFileSync("kill", ["-9", String(victim)]);
await page.waitForFunction((old) => { const e = document.querySelector("#card-workflow-3 .pid"); return e && Number(e.textContent) !== old && Number(e.textContent) > 0; },
  victim, { timeout: 5000, polling: 10 }).catch(() => fail(`workflow-3's card still shows pid ${victim}`));
const cardMs = Date.now() - killedAt;
await page.waitForFunction((old) => [...document.querySelectorAll("#events li.respawned")].some((li) => li.textContent.includes(`old_pid=${old}`)),
  victim, { timeout: 5000, polling: 10 }).catch(() => fail(`no respawned event for pid ${victim}`));
const eventMs = Date.now() - killedAt;
if (!(await page.evaluate(() => window.__sameDocument))) await fail("the page was reloaded");
console.log(`measure: kill -9 to card ${cardMs} ms, to event ${eventMs} ms`);
if (cardMs > 1000 || eventMs > 1000) await fail(`slower than a second: card ${cardMs} ms, event ${eventMs} ms`);
ok(`kill -9 ${victim} from the shell: card in ${cardMs} ms, event in ${eventMs} ms, without a reload`);
await page.screenshot({ path: `${shots}/3-after-kill.png`, fullPage: true });

// A task submitted and cancelled from the page.
await page.fill("#task-json", '{"command": ["sleep", "600"]}');
await page.click("#submit button[type=submit]");
await page.waitForFunction(() => /task \d+ queued/.test(document.querySelector("#task-msg").textContent), null, { timeout: 5000 })
  .catch(async () => fail(`submit: ${await page.textContent("#task-msg")}`));
const taskId = Number((await page.textContent("#task-msg")).match(/task (\d+)/)[1]);
await page.waitForSelector(`#task-${taskId} [data-action=cancel]`, { timeout: 10000 }).catch(() => fail(`task ${taskId} not listed`));
ok(`task ${taskId} submitted and listed`);
await page.click(`#task-${taskId} [data-action=cancel]`);
await page.waitForSelector("#confirm[open]", { timeout: 3000 });
await page.click("#confirm-yes");
await page.waitForSelector(`#task-${taskId}`, { state: "detached", timeout: 10000 }).catch(() => fail(`task ${taskId} still listed after cancel`));
const state = await page.evaluate(async (id) => (await (await fetch(`/api/v1/tasks/${id}`)).json()).state, taskId);
if (state !== "cancelled") await fail(`task ${taskId} is ${state}`);
ok(`task ${taskId} cancelled from the page`);

// A state-changing request without the CSRF token, from the page's own origin, with its cookie.
const refused = await page.evaluate(async () => {
  const r = await fetch("/api/v1/daemons/workflow-1/restart", { method: "POST", headers: { "Content-Type": "application/json" }, body: "" });
  return [r.status, (await r.json()).error];
});
if (refused[0] !== 403) await fail(`without the CSRF token: ${refused}`);
ok(`without the CSRF token: ${refused[0]} (${refused[1]})`);

// The log viewer follows and searches.
await page.selectOption("#log-name", "workflow-1");
await page.waitForFunction(() => document.querySelector("#logview").childElementCount > 0, null, { timeout: 5000 })
  .catch(() => fail("the log viewer showed nothing"));
await page.fill("#log-q", "running");
await page.waitForFunction(() => { const v = document.querySelector("#logview"); return v.childElementCount > 0 && v.querySelector("mark"); }, null, { timeout: 5000 })
  .catch(() => fail("the log search found nothing"));
ok(`the log viewer: ${await page.$eval("#logview", (v) => v.childElementCount)} lines of workflow-1 matching "running"`);

// The keyboard alone reaches a control and its dialog.
await page.focus("#log-name");
let reached = false;
for (let i = 0; i < 400 && !reached; i++) {
  await page.keyboard.press("Shift+Tab");
  reached = await page.evaluate(() => document.activeElement && document.activeElement.dataset.action === "restart");
}
if (!reached) await fail("Shift+Tab never reached a restart button");
await page.keyboard.press("Enter");
await page.waitForSelector("#confirm[open]", { timeout: 3000 }).catch(() => fail("Enter did not open the dialog"));
const focusedInDialog = await page.evaluate(() => document.activeElement && document.activeElement.id);
await page.keyboard.press("Escape");
await page.waitForSelector("#confirm:not([open])", { state: "attached", timeout: 3000 }).catch(async () => fail(`Escape did not close the dialog (focus was on ${focusedInDialog}; now ${await page.evaluate(() => [document.querySelector("#confirm").open, document.querySelector("#confirm").returnValue, document.querySelector("#confirm-msg").textContent])})`));
ok("the keyboard alone reaches a restart button, opens its dialog and closes it");

// A phone's width.
await page.setViewportSize({ width: 390, height: 844 });
await page.waitForTimeout(300);
const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
await page.screenshot({ path: `${shots}/4-phone.png`, fullPage: true });
if (overflow > 2) await fail(`at 390 px the page scrolls sideways by ${overflow} px`);
ok("at a phone's width (390 px) nothing scrolls sideways");

if (foreign.length) await fail(`requests elsewhere: ${foreign.join(", ")}`);
if (errors.length) await fail(`errors in the page: ${errors.join(" | ")}`);
ok("no request left the server, no error in the page");
await browser.close();
