// Drives hiercon's page in headless Chromium (Debian's /usr/bin/chromium, no downloaded browser):
// upload a catalogue image through the file picker and check that the item itself is the first
// result and that the predicted category is shown; narrow to a category; click a result to search
// by it. Started by the Rust test `serve::browser_upload_finds_the_item_first` with:
//   HIERCON_URL, HIERCON_IMAGE, HIERCON_EXPECT_ID, HIERCON_EXPECT_CATEGORY, HIERCON_SCREENSHOT.
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const url = env("HIERCON_URL");
const image = env("HIERCON_IMAGE");
const expectId = env("HIERCON_EXPECT_ID");
const expectCategory = env("HIERCON_EXPECT_CATEGORY");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  timeout: 60_000,
});
try {
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && problems.push(`console: ${m.text()}`));
  await page.goto(url);
  // The taxonomy fills the category picker once the index is ready.
  await page.waitForFunction(() => document.querySelectorAll("#category option").length > 1, null, { timeout: 20_000 });
  const status = await page.textContent("#status");
  assert.match(status, /gen-\d+ · \d+ items/);

  await page.setInputFiles("#file", image);
  await page.waitForSelector("#results li", { timeout: 20_000 });
  const first = await page.$eval("#results li", (li) => li.dataset.id);
  assert.equal(first, expectId, "the uploaded item is the first result");
  const firstText = await page.textContent("#results li");
  assert.ok(firstText.includes(expectCategory), `the first result shows its category: ${firstText}`);
  assert.match(await page.textContent("#summary"), /results for your image/);
  assert.match(await page.textContent("#prediction"), /Looks like: /);
  console.log(`first result is the item ${first}`);

  // Narrow to the item's top-level category: every result is in it.
  const top = expectCategory.split("/")[0];
  await page.selectOption("#category", top);
  await page.waitForFunction(
    (top) => [...document.querySelectorAll("#results li .cat")].every((d) => d.textContent.startsWith(top + "/")),
    top,
    { timeout: 20_000 },
  );
  // Group by product: no product twice.
  await page.check("#group");
  await page.waitForFunction(() => document.querySelector("#summary").textContent.includes("results"));
  const products = await page.$$eval("#results li", (lis) => lis.map((li) => li.children[3].textContent));
  assert.equal(new Set(products).size, products.length, `one result per product: ${products}`);

  // Click the second result: the page searches by that item.
  const second = await page.$eval("#results li:nth-child(2)", (li) => li.dataset.id);
  await page.click("#results li:nth-child(2)");
  await page.waitForFunction((id) => document.querySelector("#summary").textContent.includes(`item ${id}`), second, {
    timeout: 20_000,
  });
  const ids = await page.$$eval("#results li", (lis) => lis.map((li) => li.dataset.id));
  assert.ok(!ids.includes(second), "a similar-items search leaves the item itself out");
  if (process.env.HIERCON_SCREENSHOT) await page.screenshot({ path: process.env.HIERCON_SCREENSHOT, fullPage: true });
  assert.deepEqual(problems, [], "no page errors");
  console.log("page test passed");
} finally {
  await browser.close();
}
