// For scripts/bench-http: logs in through the API (a cookie), opens the dashboard and
// reports the browser's own timing once every daemon is on the page, as one JSON line.
//   NEXUS_URL=... NEXUS_KEY=... NEXUS_EXPECT=<daemons> node paint.mjs
import { chromium } from "playwright-core";
const url = process.env.NEXUS_URL, key = process.env.NEXUS_KEY, expect = Number(process.env.NEXUS_EXPECT);
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"] });
const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
const login = await context.request.post(`${url}/login`, { data: { key }, headers: { "Content-Type": "application/json" } });
if (!login.ok()) { console.log(`login ${login.status()}`); process.exit(1); }
const page = await context.newPage();
await page.goto(`${url}/`);
await page.waitForFunction((n) => document.querySelectorAll(".tile, .card[id^=card-]").length >= n, expect, { timeout: 60000, polling: 5 });
const t = await page.evaluate(() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const fcp = performance.getEntriesByName("first-contentful-paint")[0];
  return { fcp_ms: fcp ? fcp.startTime : null, tiles_ms: performance.now() - (nav ? nav.startTime : 0) };
});
const status = await page.evaluate(async () => (await (await fetch("/api/v1/status")).text()).length);
console.log(JSON.stringify({ ...t, status_bytes: status }));
await browser.close();
