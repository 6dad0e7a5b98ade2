/* Sortable tables: headings with data-sort-type become buttons. Without JavaScript the tables keep
   the order the report was written in (largest gain first). */
(function () {
  'use strict';

  function cellKey(row, index, numeric) {
    var cell = row.cells[index];
    var raw = cell ? cell.getAttribute('data-sort') : null;
    if (raw === null) {
      raw = cell ? cell.textContent.trim() : '';
    }
    if (numeric) {
      return raw === '' ? NaN : parseFloat(raw);
    }
    return raw.toLowerCase();
  }

  function sortBy(table, header, index, numeric) {
    var body = table.tBodies[0];
    var current = header.getAttribute('aria-sort');
    var descending = current ? current === 'ascending' : numeric;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellKey(a, index, numeric);
      var y = cellKey(b, index, numeric);
      if (numeric) {
        if (isNaN(x) || isNaN(y)) {
          return (isNaN(x) ? 1 : 0) - (isNaN(y) ? 1 : 0);
        }
        return descending ? y - x : x - y;
      }
      return descending ? y.localeCompare(x) : x.localeCompare(y);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(header.parentNode.cells, function (th) { th.removeAttribute('aria-sort'); });
    header.setAttribute('aria-sort', descending ? 'descending' : 'ascending');
  }

  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    if (!table.tHead || !table.tBodies.length) {
      return;
    }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, index) {
      var kind = header.getAttribute('data-sort-type');
      if (!kind) {
        return;
      }
      var button = document.createElement('button');
      button.type = 'button';
      button.className = 'sort';
      button.title = 'Sort by this column';
      while (header.firstChild) {
        button.appendChild(header.firstChild);
      }
      header.appendChild(button);
      button.addEventListener('click', function () { sortBy(table, header, index, kind === 'number'); });
    });
  });
}());
