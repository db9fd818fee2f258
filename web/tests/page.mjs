// Drives hiercon's page in headless Chromium (Debian's /usr/bin/chromium, no downloaded browser)
// the way a person would, mouse and keyboard: an example image searched with one click; an upload
// whose own item comes first, titled; the category tree (expand, select a branch: every result
// inside it); the predicted category's link; an attribute filter; one result per product; a
// result clicked to search by it; labels and alt text. Started by the Rust test
// `serve::browser_page_end_to_end` with HIERCON_URL, HIERCON_IMAGE, HIERCON_EXPECT_ID,
// HIERCON_EXPECT_TITLE, HIERCON_EXPECT_CATEGORY, HIERCON_ATTRIBUTE (`name=value`) and
// HIERCON_SCREENSHOT.
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
const expectTitle = env("HIERCON_EXPECT_TITLE");
const expectCategory = env("HIERCON_EXPECT_CATEGORY");
const [attrName, attrValue] = env("HIERCON_ATTRIBUTE").split("=");
const T = { timeout: 20_000 };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync"],
  timeout: 60_000,
});
const summaryIncludes = (page, text) =>
  page.waitForFunction((t) => document.querySelector("#summary").textContent.includes(t), text, T);
// Does `action` and waits until the page has shown the answer of the search it started.
async function searched(page, action) {
  const before = Number((await page.getAttribute("#results", "data-searches")) || 0);
  await action();
  await page.waitForFunction((n) => Number(document.querySelector("#results").dataset.searches || 0) > n, before, T);
}
const resultCategories = (page) => page.$$eval("#results > li .cat", (ds) => ds.map((d) => d.textContent));
const resultIds = (page) => page.$$eval("#results > li", (lis) => lis.map((li) => li.dataset.id));
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && problems.push(`console: ${m.text()}`));
  await page.goto(url);
  // The tree and the examples appear once the index is ready.
  await page.waitForSelector("#tree .branch", T);
  await page.waitForSelector("#examples .example", T);
  assert.match(await page.textContent("#status"), /gen-\d+ · \d+ items/);

  // Labels and alt text: every form control is labelled, every image described.
  const unlabelled = await page.$$eval("input", (is) => is.filter((i) => !i.labels.length && !i.getAttribute("aria-label")).map((i) => i.id));
  assert.deepEqual(unlabelled, [], "every input has a label");

  // One click on an example searches by it.
  const example = await page.$eval("#examples .example", (b) => b.dataset.id);
  await searched(page, () => page.click("#examples .example"));
  await summaryIncludes(page, `item ${example}`);
  assert.ok((await resultIds(page)).length > 0, "the example found results");
  console.log(`example ${example} searched with one click`);

  // Upload: the item itself comes first, its title before anything else.
  await searched(page, () => page.setInputFiles("#file", image));
  await summaryIncludes(page, "results for your image");
  const first = await page.$eval("#results > li", (li) => ({
    id: li.dataset.id,
    text: li.innerText,
    firstLine: li.querySelector(".title").textContent,
  }));
  assert.equal(first.id, expectId, "the uploaded item is the first result");
  assert.equal(first.firstLine, expectTitle, "the result is titled");
  assert.ok(first.text.indexOf(expectTitle) < first.text.indexOf(expectCategory), `title before category: ${first.text}`);
  assert.ok(first.text.includes(`${attrName}: `), `attributes shown: ${first.text}`);
  const alts = await page.$$eval("#results img, #examples img", (is) => is.map((i) => i.alt));
  assert.ok(alts.every((a) => a.trim().length > 0), `alt text on every image: ${alts}`);
  assert.match(await page.textContent("#prediction"), /Looks like: /);
  console.log(`first result is the item ${first.id}, titled ${first.firstLine}`);

  // The tree: expand the item's top-level branch with the keyboard, select its first child branch.
  const top = expectCategory.split("/")[0];
  const toggle = page.locator("#tree > li", { has: page.locator(`.branch[data-path="${top}"]`) }).locator(":scope > .toggle");
  await toggle.focus();
  await page.keyboard.press("Enter");
  assert.equal(await toggle.getAttribute("aria-expanded"), "true", "Enter expands a branch");
  const child = await page.$eval(`#tree .branch[data-path="${top}"] ~ ul .branch`, (b) => b.dataset.path);
  await page.focus(`#tree .branch[data-path="${child}"]`);
  await searched(page, () => page.keyboard.press("Enter"));
  await page.waitForFunction(
    (c) => { const cats = [...document.querySelectorAll("#results > li .cat")].map((d) => d.textContent);
             return cats.length > 0 && cats.every((t) => t === c || t.startsWith(c + "/")); },
    child, T);
  assert.equal(await page.getAttribute(`#tree .branch[data-path="${child}"]`, "aria-pressed"), "true");
  console.log(`branch ${child}: all ${(await resultCategories(page)).length} results inside it`);
  // Collapsing hides the children; the selection stays.
  await toggle.click();
  assert.equal(await page.isVisible(`#tree .branch[data-path="${child}"]`), false);

  // Back to all categories, then follow the predicted category's link: its branch is selected.
  await searched(page, () => page.click("#all"));
  const predicted = await page.textContent("#predicted");
  await searched(page, () => page.click("#predicted"));
  await page.waitForFunction(
    (c) => { const cats = [...document.querySelectorAll("#results > li .cat")].map((d) => d.textContent);
             return cats.length > 0 && cats.every((t) => t === c || t.startsWith(c + "/")); },
    predicted, T);
  assert.equal(await page.getAttribute(`#tree .branch[data-path="${predicted}"]`, "aria-pressed"), "true");
  assert.ok(await page.isVisible(`#tree .branch[data-path="${predicted}"]`), "the predicted branch is opened");
  await searched(page, () => page.click("#all"));

  // An attribute value on a result narrows to items with that value.
  await page.waitForSelector(`#results .attr[data-name="${attrName}"][data-value="${attrValue}"]`, T);
  await page.click(`#results .attr[data-name="${attrName}"][data-value="${attrValue}"]`);
  await page.waitForFunction(
    ([n, v]) => { const lis = [...document.querySelectorAll("#results > li")];
                  return lis.length > 0 && lis.every((li) => li.querySelector(`.attr[data-name="${n}"]`)?.dataset.value === v); },
    [attrName, attrValue], T);
  assert.match(await page.textContent("#filters"), new RegExp(`${attrName} = ${attrValue}`));
  console.log(`attribute filter ${attrName}=${attrValue}: ${(await resultIds(page)).length} results, all with it`);

  // One result per product.
  await searched(page, () => page.check("#group"));
  const products = await page.$$eval("#results > li .result .title", (ts) => ts.map((t) => t.textContent));
  assert.ok(products.length > 0);
  if (process.env.HIERCON_SCREENSHOT) {
    await page.screenshot({ path: process.env.HIERCON_SCREENSHOT, fullPage: true });
    console.log(`screenshot: ${process.env.HIERCON_SCREENSHOT}`);
  }
  // Remove the attribute filter with its chip; click the second result: the page searches by it.
  await searched(page, () => page.click("#filters .chip"));
  assert.equal(await page.textContent("#filters"), "", "the chip removed the filter");
  const second = await page.$eval("#results > li:nth-child(2)", (li) => li.dataset.id);
  await searched(page, () => page.click("#results > li:nth-child(2) .result"));
  await summaryIncludes(page, `item ${second}`);
  assert.ok(!(await resultIds(page)).includes(second), "a similar-items search leaves the item itself out");
  assert.deepEqual(problems, [], "no page errors");
  console.log("page test passed");
} catch (e) {
  const page = browser.contexts()[0]?.pages()[0];
  if (page) {
    console.log(`summary: ${await page.textContent("#summary")}`);
    console.log(`prediction: ${await page.textContent("#prediction")}; error: ${await page.textContent("#error")}`);
    console.log(`result categories: ${(await resultCategories(page)).join(", ")}`);
    console.log(`filters: ${await page.textContent("#filters")}`);
    if (process.env.HIERCON_SCREENSHOT) await page.screenshot({ path: process.env.HIERCON_SCREENSHOT, fullPage: true });
  }
  throw e;
} finally {
  await browser.close();
}
