// vecsim serve: a little progressive enhancement; every page works without it.
(function () {
  // k changes: show the new neighbours at once
  var k = document.getElementById("k");
  if (k) k.addEventListener("change", function () { if (k.checkValidity()) k.form.submit(); });
  // drag and drop onto the upload form
  var drop = document.getElementById("drop"), file = document.getElementById("file");
  if (drop && file) {
    ["dragenter", "dragover"].forEach(function (ev) {
      drop.addEventListener(ev, function (e) { e.preventDefault(); drop.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (ev) {
      drop.addEventListener(ev, function (e) { e.preventDefault(); drop.classList.remove("over"); });
    });
    drop.addEventListener("drop", function (e) {
      if (e.dataTransfer && e.dataTransfer.files.length) { file.files = e.dataTransfer.files; file.form.submit(); }
    });
  }
})();
